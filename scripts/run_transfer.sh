#!/usr/bin/env bash
# Representation transfer (the DCD authors' table; README, "Transfer"): distil WRN-40-2 -> WRN-16-2 on
# CIFAR-100 with each method of the table, train the student alone, then linear-probe the teacher,
# the student and every distilled student on STL-10 and Tiny-ImageNet (transfer_student.py).
# scripts/summarize.py then builds the transfer table beside the published numbers.
#
#   bash scripts/run_transfer.sh                                   # 7 methods + student alone, 3 trials, 2 targets
#   METHODS="crd kd" TRIALS=1 bash scripts/run_transfer.sh --device cuda
#   PROBE_FLAGS="--data_folder /data/transfer" bash scripts/run_transfer.sh --amp bf16
#   DRY_RUN=1 bash scripts/run_transfer.sh                         # print the commands, run nothing
#
# Arguments are passed to every command (training and probes, e.g. --device, --amp). Environment:
#   METHODS     rows of the table to produce (default: teacher student kd attention hint crd crd+kd dcd dcd+kd;
#               attention is AT, hint is FitNet); teacher: probe the teacher only; student: train_teacher.py
#               on the student's architecture
#   TARGETS     target sets of the probes (default: stl10 tinyimagenet)
#   TRIALS      trials (default 3; ids 1..TRIALS): each trial distils (or reuses) one student and probes it
#   TEACHER, STUDENT  the pair (default wrn_40_2, wrn_16_2)
#   TEACHER_DIR where the teacher is: ${TEACHER_DIR}/<teacher>_vanilla/ckpt_epoch_240.pth (default ./save/models);
#               PATH_T: the teacher file instead
#   STUDENT_DIR, MODEL_DIR, PROBE_DIR  where the students, the students trained alone and the probes go
#               (defaults ./save/student_model, ./save/models, ./save/transfer: the scripts' own defaults)
#   TRAIN_FLAGS extra flags of the training commands only (e.g. "--data_folder ./data" for CIFAR-100)
#   PROBE_FLAGS extra flags of the probes only (e.g. "--data_folder /data/transfer", "--no_augment")
#   PYTHON      the interpreter (default python)
#   DRY_RUN=1   print each command (one line, shell-quoted) instead of running it
#   KEEP_GOING=1  run the remaining commands after one fails (default: stop at the first failure)
# A run folder that already holds a finished run (results.json "finished" and its last checkpoint, or a
# finished probe) is reused, not run again ("reuse:" on stderr).
if [ -z "${BASH_VERSION:-}" ]; then  # started as `sh scripts/...` (dash on Debian): rerun with bash
  command -v bash > /dev/null 2>&1 || { echo "error: $0 needs bash, which is not installed" >&2; exit 2; }
  exec bash "$0" "$@"
fi
set +o posix
set -euo pipefail
cd "$(dirname "$0")/.."

# method name -> train_student.py flags (RepDistiller's scripts; DCD's for dcd), the weights written out
# (-r left out: 1) so that the run folder's name (S:<s>_T:<t>_cifar100_<distill>_r:<r>_a:<a>_b:<b>_<trial>) is known here
METHOD_TABLE=(
  "kd         --distill kd -r 0.1 -a 0.9 -b 0"
  "attention  --distill attention -a 0 -b 1000"
  "hint       --distill hint -a 0 -b 100"
  "crd        --distill crd -a 0 -b 0.8"
  "crd+kd     --distill crd -a 1 -b 0.8"
  "dcd        --distill dcd -a 0 -b 1"
  "dcd+kd     --distill dcd -a 1 -b 1"
)

. scripts/common.sh
ARGS=("$@")
METHODS=${METHODS:-teacher student kd attention hint crd crd+kd dcd dcd+kd}; METHODS=${METHODS//,/ }  # spaces or commas
TARGETS=${TARGETS:-stl10 tinyimagenet}
TRIALS=${TRIALS:-3}
TEACHER=${TEACHER:-wrn_40_2}
STUDENT=${STUDENT:-wrn_16_2}
TEACHER_DIR=${TEACHER_DIR:-./save/models}
STUDENT_DIR=${STUDENT_DIR:-./save/student_model}
MODEL_DIR=${MODEL_DIR:-./save/models}
PROBE_DIR=${PROBE_DIR:-./save/transfer}
PYTHON=${PYTHON:-python}
read -r -a TRAIN_EXTRA <<< "${TRAIN_FLAGS:-}"
read -r -a PROBE_EXTRA <<< "${PROBE_FLAGS:-}"
PATH_T=${PATH_T:-$TEACHER_DIR/${TEACHER}_vanilla/ckpt_epoch_240.pth}

for method in $METHODS; do
  if [ "$method" != teacher ] && [ "$method" != student ] && ! flags_for "$method" > /dev/null; then
    names="teacher student"; for line in "${METHOD_TABLE[@]}"; do names="$names ${line%% *}"; done
    echo "error: unknown method '$method'; choose from: $names" >&2; exit 2
  fi
done
for target in $TARGETS; do
  case "$target" in stl10|tinyimagenet|cifar10|cifar100|synthetic) ;;
    *) echo "error: unknown target set '$target'; choose from: stl10 tinyimagenet cifar10 cifar100 synthetic" >&2
       exit 2 ;;
  esac
done
if [ -z "${DRY_RUN:-}" ] && [ ! -e "$PATH_T" ]; then
  echo "error: teacher checkpoint missing: $PATH_T" >&2
  echo "  fetch the published ones with 'bash scripts/fetch_pretrained_teachers.sh', train it with" >&2
  echo "  'bash scripts/run_cifar_vanilla.sh', or point TEACHER_DIR / PATH_T at yours" >&2
  exit 2
fi

as_float() {  # a weight as Python's float() prints it (1 -> 1.0, 0.8 -> 0.8): train_student.py's folder names
  case "$1" in *.*|*e*) echo "$1" ;; *) echo "$1.0" ;; esac
}

student_run() {  # method trial -> the run folder train_student.py makes for it
  local distill="" r="" a="" b="" prev=""
  read -r -a words <<< "$(flags_for "$1")"
  for word in "${words[@]}"; do
    case "$prev" in --distill) distill=$word ;; -r) r=$word ;; -a) a=$word ;; -b) b=$word ;; esac
    prev=$word
  done
  if [ -z "$r" ]; then r=1; else r=$(as_float "$r"); fi  # -r left out: RepDistiller's default 1, an int
  echo "$STUDENT_DIR/S:${STUDENT}_T:${TEACHER}_cifar100_${distill}_r:${r}_a:$(as_float "$a")_b:$(as_float "$b")_$2"
}

finished() {  # folder [checkpoint]: a finished run (results.json says so, and the checkpoint is there)
  [ -f "$1/results.json" ] && grep -q '"status": "finished"' "$1/results.json" && { [ -z "${2:-}" ] || [ -f "$2" ]; }
}

probe() {  # checkpoint source-run-name trial: probe it on every target (a finished probe is reused)
  local target folder
  for target in $TARGETS; do
    folder="$PROBE_DIR/$2_${target}_probe_trial_$3"
    if finished "$folder"; then echo "reuse: $folder" >&2; continue; fi
    run "$PYTHON" transfer_student.py --path_s "$1" --dataset "$target" --trial "$3" --save_folder "$PROBE_DIR" \
      ${PROBE_EXTRA[@]+"${PROBE_EXTRA[@]}"} ${ARGS[@]+"${ARGS[@]}"} || true
  done
}

teacher_name=$(basename "$(dirname "$PATH_T")")_$(basename "$PATH_T" .pth)
for trial in $(seq 1 "$TRIALS"); do
  for method in $METHODS; do
    case "$method" in
      teacher)
        probe "$PATH_T" "$teacher_name" "$trial" ;;
      student)
        case "$STUDENT" in MobileNetV2|ShuffleV1|ShuffleV2) lr=0.01 ;; *) lr=0.05 ;; esac  # train_teacher.py's default
        folder="$MODEL_DIR/${STUDENT}_cifar100_lr_${lr}_decay_0.0005_trial_${trial}"
        ckpt="$folder/${STUDENT}_last.pth"
        if finished "$folder" "$ckpt"; then echo "reuse: $folder" >&2
        else run "$PYTHON" train_teacher.py --model "$STUDENT" --dataset cifar100 --trial "$trial" \
               --save_folder "$MODEL_DIR" --resume auto ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} ${ARGS[@]+"${ARGS[@]}"} || true
        fi
        probe "$ckpt" "$(basename "$folder")" "$trial" ;;
      *)
        folder=$(student_run "$method" "$trial")
        ckpt="$folder/${STUDENT}_last.pth"
        if finished "$folder" "$ckpt"; then echo "reuse: $folder" >&2
        else
          read -r -a flags <<< "$(flags_for "$method")"
          run "$PYTHON" train_student.py --path_t "$PATH_T" --model_s "$STUDENT" --dataset cifar100 "${flags[@]}" \
            --trial "$trial" --save_folder "$STUDENT_DIR" --resume auto ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} \
            ${ARGS[@]+"${ARGS[@]}"} || true
        fi
        probe "$ckpt" "$(basename "$folder")" "$trial" ;;
    esac
  done
done
finish

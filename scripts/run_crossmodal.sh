#!/usr/bin/env bash
# Cross-modal distillation, CRD's Lab experiment: a teacher trained on the luminance channel L of a
# labelled set distils students that see only the colour channels ab of STL-10's unlabelled images
# (no labels: no cross-entropy, no KD), then every network is judged by a linear probe of its frozen
# features on STL-10's labelled images (the probe feeds each network the view it was trained on).
#
#   bash scripts/run_crossmodal.sh --data_folder ./data          # teacher, 3 students, student alone, probes
#   METHODS="crd alone" TRIALS=1 bash scripts/run_crossmodal.sh
#   DRY_RUN=1 bash scripts/run_crossmodal.sh                      # print the commands, run nothing
#   LABELLED=synthetic TARGET=synthetic TEACHER=resnet8x4 STUDENT=resnet8 DISTILL_FLAGS="--nce_k 512" \
#     bash scripts/run_crossmodal.sh --synthetic_classes 10 --epochs 2 --device cpu   # minutes on a CPU
#
# Arguments are passed to every command (train_teacher.py, train_student.py and transfer_student.py
# all accept the data, device and schedule flags, e.g. --data_folder, --device, --epochs). Environment:
#   TEACHER, STUDENT  architectures (default wrn_40_2 and wrn_16_2)
#   LABELLED    the labelled set the teacher learns on, view L (default cifar100; stl10: its 5,000 labelled images)
#   TARGET      the set whose unlabelled split the students learn on, view ab, and the probes' set (default stl10)
#   METHODS     students to make (default: crd hint attention alone): crd, hint (FitNet), attention (AT)
#               distil from the teacher on TARGET's unlabelled split; alone trains the student with labels on
#               LABELLED's ab view (the baseline without a teacher)
#   DISTILL_FLAGS  extra flags of the train_student.py commands only (e.g. "--nce_k 4096")
#   TRIALS      trials per student (default 1; trial ids 1..TRIALS); the teacher is trial 0
#   SAVE        parent of the run folders (default ./save)
#   PYTHON      the interpreter (default python); LAUNCH replaces it, e.g. "torchrun --standalone --nproc_per_node 2"
#   DRY_RUN=1   print each command (one line, shell-quoted) instead of running it
#   KEEP_GOING=1  run the remaining commands after one fails
# RGB -> depth (NYU-Depth-style pairs) is the same protocol with --dataset paired: see README, "Transfer".
if [ -z "${BASH_VERSION:-}" ]; then  # started as `sh scripts/...` (dash on Debian): rerun with bash
  command -v bash > /dev/null 2>&1 || { echo "error: $0 needs bash, which is not installed" >&2; exit 2; }
  exec bash "$0" "$@"
fi
set +o posix  # bash started as sh (e.g. macOS): leave POSIX mode for the bash syntax below
set -euo pipefail
cd "$(dirname "$0")/.."

# method -> train_student.py flags: KD-free (no labels, and the teacher's classes are not the target's);
# --split unlabeled leaves out the cross-entropy term (-r 0)
METHOD_TABLE=(
  "crd        --distill crd -a 0 -b 0.8"
  "hint       --distill hint -a 0 -b 100"
  "attention  --distill attention -a 0 -b 1000"
)

. scripts/common.sh
TEACHER=${TEACHER:-wrn_40_2}
STUDENT=${STUDENT:-wrn_16_2}
LABELLED=${LABELLED:-cifar100}
TARGET=${TARGET:-stl10}
METHODS=${METHODS:-crd hint attention alone}; METHODS=${METHODS//,/ }  # spaces or commas
TRIALS=${TRIALS:-1}
SAVE=${SAVE:-./save}
PYTHON=${PYTHON:-python}
read -r -a LAUNCH_WORDS <<< "${LAUNCH:-$PYTHON}"
read -r -a DISTILL_WORDS <<< "${DISTILL_FLAGS:-}"

for method in $METHODS; do
  if [ "$method" != alone ] && ! flags_for "$method" > /dev/null; then
    echo "error: unknown method '$method'; choose from: crd hint attention alone" >&2; exit 2
  fi
done

flag_value() {  # the value of flag $1 among the remaining arguments, or $2 when absent
  local name=$1 value=$2; shift 2
  while [ $# -gt 0 ]; do
    case "$1" in "$name") [ $# -gt 1 ] && value=$2 ;; "$name"=*) value=${1#*=} ;; esac
    shift
  done
  echo "$value"
}

# train_teacher.py's run folder: <model>_<dataset>_view_<view>_lr_<lr>_decay_<wd>_trial_<trial> (floats as Python prints them)
teacher_folder() {  # model dataset view trial args...
  local model=$1 dataset=$2 view=$3 trial=$4 lr wd; shift 4
  case "$model" in MobileNetV2|ShuffleV1|ShuffleV2) lr=0.01 ;; *) lr=0.05 ;; esac
  lr=$(flag_value --learning_rate "$lr" "$@"); wd=$(flag_value --weight_decay 0.0005 "$@")
  lr=$("$PYTHON" -c "import sys; print(float(sys.argv[1]))" "$lr" 2> /dev/null || echo "$lr")
  wd=$("$PYTHON" -c "import sys; print(float(sys.argv[1]))" "$wd" 2> /dev/null || echo "$wd")
  echo "$SAVE/models/${model}_${dataset}_view_${view}_lr_${lr}_decay_${wd}_trial_${trial}"
}

teacher_ckpt="$(teacher_folder "$TEACHER" "$LABELLED" L 0 "$@")/${TEACHER}_last.pth"
run "${LAUNCH_WORDS[@]}" train_teacher.py --model "$TEACHER" --dataset "$LABELLED" --view L --trial 0 \
  --save_folder "$SAVE/models" --resume auto "$@" || true
run "${LAUNCH_WORDS[@]}" transfer_student.py --path_s "$teacher_ckpt" --dataset "$TARGET" --trial 0 \
  --save_folder "$SAVE/transfer" "$@" || true

for trial in $(seq 1 "$TRIALS"); do
  for method in $METHODS; do
    if [ "$method" = alone ]; then
      ckpt="$(teacher_folder "$STUDENT" "$LABELLED" ab "$trial" "$@")/${STUDENT}_last.pth"
      run "${LAUNCH_WORDS[@]}" train_teacher.py --model "$STUDENT" --dataset "$LABELLED" --view ab --trial "$trial" \
        --save_folder "$SAVE/models" --resume auto "$@" || true
    else
      read -r -a flags <<< "$(flags_for "$method")"
      b=$("$PYTHON" -c "import sys; print(float(sys.argv[1]))" "${flags[5]}" 2> /dev/null || echo "${flags[5]}")
      name="S:${STUDENT}_T:${TEACHER}_${TARGET}_${flags[1]}_r:0_a:0.0_b:${b}_view_s:ab_view_t:L_split:unlabeled_${trial}"
      ckpt="$SAVE/student_model/$name/${STUDENT}_last.pth"
      run "${LAUNCH_WORDS[@]}" train_student.py --path_t "$teacher_ckpt" --model_s "$STUDENT" --dataset "$TARGET" \
        --split unlabeled --view_t L --view_s ab "${flags[@]}" --trial "$trial" --save_folder "$SAVE/student_model" \
        --resume auto "${DISTILL_WORDS[@]}" "$@" || true
    fi
    run "${LAUNCH_WORDS[@]}" transfer_student.py --path_s "$ckpt" --dataset "$TARGET" --trial "$trial" \
      --save_folder "$SAVE/transfer" "$@" || true
  done
done
finish

#!/usr/bin/env bash
# Distil CIFAR-100 students with every method of the CRD paper's tables (README, "Reproducing the
# paper"), on every teacher -> student pair of both tables, with each method's published weights.
#
#   bash scripts/run_cifar_distill.sh                                # everything: 26 methods x 13 pairs x 3 trials
#   METHODS="crd kd" PAIRS="resnet32x4:resnet8x4 vgg13:vgg8" TRIALS=1 bash scripts/run_cifar_distill.sh
#   TEACHER=wrn_40_2 STUDENT=wrn_16_2 bash scripts/run_cifar_distill.sh --amp bf16 --data_folder /data
#   DRY_RUN=1 bash scripts/run_cifar_distill.sh                      # print the commands, run nothing
#   LAUNCH="torchrun --standalone --nproc_per_node 2" bash scripts/run_cifar_distill.sh --batch_size 32
#
# Arguments are passed to every train_student.py command (e.g. --amp bf16, --data_folder,
# --resume auto to make a stopped sweep restartable). Environment:
#   METHODS     methods to run, spaces or commas (default: the tables' 26, below; also crcd, kdsvd, itrd, ega, reviewkd, ofd)
#   PAIRS       teacher:student pairs, spaces or commas (default: the 13 of both tables, below)
#   TEACHER, STUDENT  keep only the pairs with this teacher / student; both set: that one pair
#   TRIALS      trials per run (default 3; trial ids 1..TRIALS); TRIAL=N runs only trial N
#   TEACHER_DIR where the teachers are: ${TEACHER_DIR}/<teacher>_vanilla/ckpt_epoch_240.pth
#               (default ./save/models, where fetch_pretrained_teachers.sh and run_cifar_vanilla.sh put them)
#   PATH_T      one teacher file for every command instead (with a single teacher)
#   PYTHON      the interpreter (default python); LAUNCH replaces it, e.g. "torchrun --standalone --nproc_per_node 2"
#   DRY_RUN=1   print each command (one line, shell-quoted) instead of running it
#   KEEP_GOING=1  run the remaining commands after one fails (default: stop at the first failure)
# fsp and kdsvd need equal channel counts: they are skipped (n/a, as in the paper) for other pairs.
if [ -z "${BASH_VERSION:-}" ]; then  # started as `sh scripts/...` (dash on Debian): rerun with bash
  command -v bash > /dev/null 2>&1 || { echo "error: $0 needs bash, which is not installed" >&2; exit 2; }
  exec bash "$0" "$@"
fi
set +o posix  # bash started as sh (e.g. macOS): leave POSIX mode for the bash syntax below
set -euo pipefail
cd "$(dirname "$0")/.."

# method name -> train_student.py flags (RepDistiller's scripts for the classic methods; each paper's for the others)
METHOD_TABLE=(
  "kd           --distill kd -r 0.1 -a 0.9 -b 0"
  "hint         --distill hint -a 0 -b 100"
  "attention    --distill attention -a 0 -b 1000"
  "similarity   --distill similarity -a 0 -b 3000"
  "correlation  --distill correlation -a 0 -b 0.02"
  "vid          --distill vid -a 0 -b 1"
  "rkd          --distill rkd -a 0 -b 1"
  "pkt          --distill pkt -a 0 -b 30000"
  "abound       --distill abound -a 0 -b 1"
  "factor       --distill factor -a 0 -b 200"
  "fsp          --distill fsp -a 0 -b 50"
  "nst          --distill nst -a 0 -b 50"
  "crd          --distill crd -a 0 -b 0.8"
  "crd+kd       --distill crd -a 1 -b 0.8"
  "dcd          --distill dcd -a 0 -b 1"
  "dcd+kd       --distill dcd -a 1 -b 1"
  "wcord+kd     --distill wcord -a 1 -b 0.8"
  "dkd          --distill dkd -a 0 -b 1"
  "rrd          --distill rrd -a 0 -b 1"
  "rrd+kd       --distill rrd -a 1 -b 1"
  "srrl         --distill srrl -a 1 -b 1"
  "semckd       --distill semckd -a 1 -b 400"
  "simkd        --distill simkd -r 0 -a 0 -b 1"
  "ickd         --distill ickd -a 0 -b 2.5"
  "ickd+kd      --distill ickd -a 1 -b 2.5"
  "dist         --distill dist -a 0 -b 2"
  # not in the CIFAR tables; run them with METHODS=
  "crcd         --distill crcd -a 0.9 -b 1"
  "kdsvd        --distill kdsvd -a 0 -b 1"
  "itrd         --distill itrd -a 0 -b 1"
  "ega          --distill ega -a 0 -b 1"
  "reviewkd     --distill reviewkd -a 0 -b 5"
  "ofd          --distill ofd -a 0 -b 0.001"
)
TABLE_METHODS="kd hint attention similarity correlation vid rkd pkt abound factor fsp nst crd crd+kd dcd dcd+kd wcord+kd dkd rrd rrd+kd srrl semckd simkd ickd ickd+kd dist"

# teacher:student, same architecture (first 7) and different architecture (last 6)
PAIR_TABLE=(
  wrn_40_2:wrn_16_2 wrn_40_2:wrn_40_1 resnet56:resnet20 resnet110:resnet20 resnet110:resnet32
  resnet32x4:resnet8x4 vgg13:vgg8
  vgg13:MobileNetV2 ResNet50:MobileNetV2 ResNet50:vgg8 resnet32x4:ShuffleV1 resnet32x4:ShuffleV2 wrn_40_2:ShuffleV1
)
# the pairs whose channel counts agree at every stage: the only ones fsp and kdsvd can serve
EQUAL_CHANNELS="wrn_40_2:wrn_16_2 resnet56:resnet20 resnet110:resnet20 resnet110:resnet32 resnet32x4:resnet8x4 vgg13:vgg8"

. scripts/common.sh
METHODS=${METHODS:-$TABLE_METHODS}; METHODS=${METHODS//,/ }  # spaces or commas
TRIALS=${TRIALS:-3}
TEACHER_DIR=${TEACHER_DIR:-./save/models}
PYTHON=${PYTHON:-python}
read -r -a LAUNCH_WORDS <<< "${LAUNCH:-$PYTHON}"
if [ -n "${TRIAL:-}" ]; then TRIAL_IDS=$TRIAL; else TRIAL_IDS=$(seq 1 "$TRIALS"); fi

if [ -z "${PAIRS:-}" ]; then
  if [ -n "${TEACHER:-}" ] && [ -n "${STUDENT:-}" ]; then
    PAIRS="$TEACHER:$STUDENT"
  else
    PAIRS=""
    for pair in "${PAIR_TABLE[@]}"; do
      [ -n "${TEACHER:-}" ] && [ "${pair%%:*}" != "$TEACHER" ] && continue
      [ -n "${STUDENT:-}" ] && [ "${pair##*:}" != "$STUDENT" ] && continue
      PAIRS="$PAIRS $pair"
    done
    if [ -z "$PAIRS" ]; then echo "error: no pair of the tables has TEACHER=${TEACHER:-} STUDENT=${STUDENT:-}; set PAIRS=teacher:student" >&2; exit 2; fi
  fi
fi
PAIRS=${PAIRS//,/ }

teacher_path() { echo "${PATH_T:-$TEACHER_DIR/$1_vanilla/ckpt_epoch_240.pth}"; }

# check the selection before running anything
for method in $METHODS; do
  if ! flags_for "$method" > /dev/null; then
    names=""; for line in "${METHOD_TABLE[@]}"; do names="$names ${line%% *}"; done
    echo "error: unknown method '$method'; choose from:$names" >&2; exit 2
  fi
done
for pair in $PAIRS; do
  case "$pair" in *?:?*) ;; *) echo "error: PAIRS entry '$pair' is not teacher:student" >&2; exit 2 ;; esac
done
if [ -z "${DRY_RUN:-}" ]; then
  missing=""
  for pair in $PAIRS; do
    path=$(teacher_path "${pair%%:*}")
    [ -e "$path" ] || case " $missing " in *" $path "*) ;; *) missing="$missing $path" ;; esac
  done
  if [ -n "$missing" ]; then
    echo "error: teacher checkpoint(s) missing:$missing" >&2
    echo "  fetch the published ones with 'bash scripts/fetch_pretrained_teachers.sh', train them with" >&2
    echo "  'bash scripts/run_cifar_vanilla.sh', or point TEACHER_DIR / PATH_T at yours" >&2
    exit 2
  fi
fi

for trial in $TRIAL_IDS; do
  for pair in $PAIRS; do
    teacher=${pair%%:*} student=${pair##*:}
    for method in $METHODS; do
      if { [ "$method" = fsp ] || [ "$method" = kdsvd ]; } && [[ " $EQUAL_CHANNELS " != *" $pair "* ]]; then
        echo "skip: $method is n/a for $teacher -> $student (unequal channel counts)" >&2
        continue
      fi
      method_flags "$method"
      cmd=("${LAUNCH_WORDS[@]}" train_student.py --path_t "${PATH_T:-$TEACHER_DIR/${teacher}_vanilla/ckpt_epoch_240.pth}"
           --model_s "$student" "${FLAGS[@]}" --trial "$trial" "$@")
      run "${cmd[@]}" || true
    done
  done
done
finish

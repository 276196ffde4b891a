#!/usr/bin/env bash
# Train the CRD paper's CIFAR-100 teachers, and its students alone (the tables' "teacher" and
# "student" rows), with train_teacher.py and the recipe's defaults (240 epochs, lr 0.05, or 0.01
# for MobileNetV2/ShuffleV1/ShuffleV2, x0.1 at 150/180/210, wd 5e-4, batch 64).
#
#   bash scripts/run_cifar_vanilla.sh                          # 6 teachers, then 9 students, 1 trial each
#   TRIALS=3 STUDENTS="resnet8x4 vgg8" TEACHERS="" bash scripts/run_cifar_vanilla.sh --amp bf16
#   DRY_RUN=1 bash scripts/run_cifar_vanilla.sh                # print the commands, run nothing
#
# Arguments are passed to every train_teacher.py command. Environment:
#   TEACHERS    teachers to train (default: wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50)
#   STUDENTS    students to train alone (default: every student of the tables, below)
#   TRIALS      trials per network (default 1; trial ids 0..TRIALS-1); TEACHER_TRIALS and
#               STUDENT_TRIALS set them apart
#   TEACHER_DIR where run_cifar_distill.sh looks for teachers (default ./save/models)
#   LINK        1 (default): once a teacher's trial 0 has its ckpt_epoch_240.pth, link
#               ${TEACHER_DIR}/<model>_vanilla/ckpt_epoch_240.pth to it (a relative symlink), the
#               path run_cifar_distill.sh and RepDistiller use; a regular file already there (a
#               fetched published teacher) is kept. LINK=force replaces it; LINK=0 links nothing.
#   PYTHON      the interpreter (default python); LAUNCH replaces it, e.g. "torchrun --standalone --nproc_per_node 2"
#   DRY_RUN=1   print each command (one line, shell-quoted) instead of running it; the link steps
#               are printed as '# link ...' comments
#   KEEP_GOING=1  run the remaining commands after one fails
# Each run writes save/models/<model>_cifar100_lr_<lr>_decay_<wd>_trial_<trial>/ (train_teacher.py's layout).
if [ -z "${BASH_VERSION:-}" ]; then  # started as `sh scripts/...` (dash on Debian): rerun with bash
  command -v bash > /dev/null 2>&1 || { echo "error: $0 needs bash, which is not installed" >&2; exit 2; }
  exec bash "$0" "$@"
fi
set +o posix  # bash started as sh (e.g. macOS): leave POSIX mode for the bash syntax below
set -euo pipefail
cd "$(dirname "$0")/.."

TEACHERS=${TEACHERS-"wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50"}
STUDENTS=${STUDENTS-"wrn_16_2 wrn_40_1 resnet20 resnet32 resnet8x4 vgg8 MobileNetV2 ShuffleV1 ShuffleV2"}
. scripts/common.sh
TRIALS=${TRIALS:-1}
TEACHER_TRIALS=${TEACHER_TRIALS:-$TRIALS}
STUDENT_TRIALS=${STUDENT_TRIALS:-$TRIALS}
TEACHER_DIR=${TEACHER_DIR:-./save/models}
LINK=${LINK:-1}
PYTHON=${PYTHON:-python}
read -r -a LAUNCH_WORDS <<< "${LAUNCH:-$PYTHON}"

# where train_teacher.py will write each teacher's trial-0 ckpt_epoch_240.pth with these arguments:
# one line per model, "<model> TAB <path> TAB <that path relative to ${TEACHER_DIR}/<model>_vanilla>"
RUN_CKPTS='import os, sys, train_teacher
teacher_dir, models, args = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
for model in models:
    path = os.path.join(train_teacher.parse_option(["--model", model, "--trial", "0", *args]).save_path, "ckpt_epoch_240.pth")
    print(model, path, os.path.relpath(path, os.path.join(teacher_dir, model + "_vanilla")), sep="\t")'
declare -A RUN_CKPT=() RUN_TARGET=()
if [ -z "${DRY_RUN:-}" ] && [ "$LINK" != 0 ] && [ -n "${TEACHERS// /}" ]; then  # one Python start for all
  listing=$("$PYTHON" -c "$RUN_CKPTS" "$TEACHER_DIR" "$TEACHERS" "$@") || {
    echo "error: train_teacher.py rejects these arguments (see above): $*" >&2; exit 2; }
  while IFS=$'\t' read -r model ckpt target; do RUN_CKPT[$model]=$ckpt RUN_TARGET[$model]=$target; done <<< "$listing"
fi

link_teacher() {  # model: make ${TEACHER_DIR}/<model>_vanilla/ckpt_epoch_240.pth point at its trial-0 run
  local model=$1 dir="$TEACHER_DIR/$1_vanilla"
  if [ -n "${DRY_RUN:-}" ]; then
    echo "# link $dir/ckpt_epoch_240.pth -> the ckpt_epoch_240.pth of: train_teacher.py --model $model --trial 0 ${*:2}"
    return 0
  fi
  local ckpt=${RUN_CKPT[$model]:-} target=${RUN_TARGET[$model]:-}
  if [ ! -f "$ckpt" ]; then
    echo "note: $ckpt does not exist (fewer than 240 epochs?): $model not linked" >&2
    return 0
  fi
  mkdir -p "$dir"
  if [ -f "$dir/ckpt_epoch_240.pth" ] && [ ! -L "$dir/ckpt_epoch_240.pth" ] && [ "$LINK" != force ]; then
    echo "note: kept the existing $dir/ckpt_epoch_240.pth (a fetched teacher?); LINK=force replaces it with yours" >&2
  else
    ln -sfn "$target" "$dir/ckpt_epoch_240.pth.tmp" && mv -fT "$dir/ckpt_epoch_240.pth.tmp" "$dir/ckpt_epoch_240.pth"
    echo "linked $dir/ckpt_epoch_240.pth -> $target"
  fi
}



for model in $TEACHERS; do
  for trial in $(seq 0 $((TEACHER_TRIALS - 1))); do
    if run "${LAUNCH_WORDS[@]}" train_teacher.py --model "$model" --trial "$trial" "$@" \
        && [ "$trial" = 0 ] && [ "$LINK" != 0 ]; then
      link_teacher "$model" "$@"
    fi
  done
done
for model in $STUDENTS; do
  for trial in $(seq 0 $((STUDENT_TRIALS - 1))); do
    run "${LAUNCH_WORDS[@]}" train_teacher.py --model "$model" --trial "$trial" "$@" || true
  done
done
finish

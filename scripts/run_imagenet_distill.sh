#!/usr/bin/env bash
# Distil ImageNet ResNet18 from torchvision's ResNet34 with KD, CRD and CRD+KD (the CRD paper's
# ImageNet table), one torchrun job per method. Recipe: 100 epochs, SGD momentum 0.9, lr 0.1 for
# a total batch of 256 (each process gets 256 / processes), x0.1 at epochs 30, 60, 90, wd 1e-4.
#
#   bash scripts/run_imagenet_distill.sh                            # 8 GPUs, kd, crd, crd+kd
#   NPROC=4 METHODS=crd DATA=/data/imagenet bash scripts/run_imagenet_distill.sh --amp bf16
#   DRY_RUN=1 bash scripts/run_imagenet_distill.sh                  # print the commands, run nothing
#
# Arguments are passed to every train_student.py command. Environment:
#   NPROC       processes (GPUs) per node (default 8); NNODES nodes (default 1, for the batch split)
#   BATCH       total batch over all processes (default 256); LR its learning rate (default 0.1 x BATCH/256)
#   DATA        ImageNet folder with train/<class>/ and val/<class>/ (default ./data/imagenet)
#   TEACHER     the ResNet34 teacher checkpoint (default ./save/models/ResNet34_torchvision/ckpt.pth)
#   TV_WEIGHTS  a local torchvision ResNet34 state dict (e.g. resnet34-b627a593.pth from
#               download.pytorch.org) to build TEACHER from; default: torchvision's IMAGENET1K_V1
#               weights, which torchvision downloads into its cache (needs the network once)
#   METHODS     default "kd crd crd+kd"; also dkd and crcd
#   TRIALS      trials per method (default 1; trial ids 1..TRIALS)
#   LAUNCH      the launcher (default "torchrun --standalone --nproc_per_node $NPROC"; for several
#               nodes give your own torchrun line and set NNODES)
#   PYTHON      the interpreter for the teacher conversion (default python)
#   DRY_RUN=1   print each command (one line, shell-quoted) instead of running it
#   KEEP_GOING=1  run the remaining methods after one fails
#
# The teacher: train_student.py loads {'model': state_dict, 'arch': ...} checkpoints (or
# RepDistiller's {'model': ...} in a <model>_... folder). torchvision's file is a bare state dict
# with the parameter names of our ResNet34, so when TEACHER is missing this script first wraps it:
#   python -c "import torch, torchvision; sd = torchvision.models.resnet34(weights='IMAGENET1K_V1').state_dict(); \
#              torch.save({'model': sd, 'arch': 'ResNet34', 'dataset': 'imagenet', 'num_classes': 1000}, 'ckpt.pth')"
# (the teacher's top-1 is measured and printed at the start of every run: 73.31 expected).
#
# Weights: kd is the DKD paper's ImageNet re-run (-r 0.5 -a 0.5, T=1: the 71.03 of the table);
# crd and crd+kd are the CRD paper's (-a 0 -b 0.8, -a 1 -b 0.8 with T=4); dkd is DKD's ImageNet
# setting (beta 0.5, T=1, 1 warm-up epoch); crcd uses its CIFAR weights (its ImageNet ones unverified).
if [ -z "${BASH_VERSION:-}" ]; then  # started as `sh scripts/...` (dash on Debian): rerun with bash
  command -v bash > /dev/null 2>&1 || { echo "error: $0 needs bash, which is not installed" >&2; exit 2; }
  exec bash "$0" "$@"
fi
set +o posix  # bash started as sh (e.g. macOS): leave POSIX mode for the bash syntax below
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD_TABLE=(
  "kd       --distill kd -r 0.5 -a 0.5 -b 0 --kd_T 1"
  "crd      --distill crd -a 0 -b 0.8"
  "crd+kd   --distill crd -a 1 -b 0.8"
  "dkd      --distill dkd -a 0 -b 1 --dkd_beta 0.5 --dkd_T 1 --dkd_warmup 1"
  "crcd     --distill crcd -a 0.9 -b 1"
)
. scripts/common.sh
METHODS=${METHODS:-"kd crd crd+kd"}; METHODS=${METHODS//,/ }  # spaces or commas
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
BATCH=${BATCH:-256}
LR=${LR:-$(awk -v b="$BATCH" 'BEGIN { print 0.1 * b / 256 }')}
DATA=${DATA:-./data/imagenet}
TEACHER=${TEACHER:-./save/models/ResNet34_torchvision/ckpt.pth}
TV_WEIGHTS=${TV_WEIGHTS:-}
TRIALS=${TRIALS:-1}
PYTHON=${PYTHON:-python}
read -r -a LAUNCH_WORDS <<< "${LAUNCH:-torchrun --standalone --nproc_per_node $NPROC}"

WORLD=$((NPROC * NNODES))
if [ $((BATCH % WORLD)) -ne 0 ]; then
  echo "error: BATCH=$BATCH does not split over $WORLD processes (NPROC=$NPROC x NNODES=$NNODES)" >&2; exit 2
fi
PER_PROCESS_BATCH=$((BATCH / WORLD))
RECIPE=(--dataset imagenet --data_folder "$DATA" --model_s ResNet18 --epochs 100 --batch_size "$PER_PROCESS_BATCH"
        --learning_rate "$LR" --lr_decay_epochs 30,60,90 --lr_decay_rate 0.1 --weight_decay 1e-4 --momentum 0.9)

for method in $METHODS; do
  flags_for "$method" > /dev/null || { echo "error: unknown method '$method'; choose from: kd crd crd+kd dkd crcd" >&2; exit 2; }
done


# wrap torchvision's ResNet34 weights as a train_student.py teacher checkpoint (written atomically)
CONVERT='import os, sys, torch, torchvision; src, dst = sys.argv[1], sys.argv[2]; sd = torch.load(src, map_location="cpu", weights_only=True) if src else torchvision.models.resnet34(weights="IMAGENET1K_V1").state_dict(); os.makedirs(os.path.dirname(dst) or ".", exist_ok=True); torch.save({"model": sd, "arch": "ResNet34", "dataset": "imagenet", "num_classes": 1000}, dst + ".tmp"); os.replace(dst + ".tmp", dst); print("wrote", dst)'
if [ ! -e "$TEACHER" ]; then
  convert=("$PYTHON" -c "$CONVERT" "$TV_WEIGHTS" "$TEACHER")
  if [ -n "${DRY_RUN:-}" ]; then
    quote "${convert[@]}"
  else
    echo "+ building the teacher $TEACHER from torchvision's ResNet34 ${TV_WEIGHTS:-(IMAGENET1K_V1)}"
    "${convert[@]}" || { echo "error: could not build $TEACHER; give TV_WEIGHTS=<resnet34 state dict> or TEACHER=<checkpoint>" >&2; exit 2; }
  fi
fi

for trial in $(seq 1 "$TRIALS"); do
  for method in $METHODS; do
    read -r -a flags <<< "$(flags_for "$method")"
    cmd=("${LAUNCH_WORDS[@]}" train_student.py --path_t "$TEACHER" "${RECIPE[@]}" "${flags[@]}" --trial "$trial" "$@")
    run "${cmd[@]}" || true
  done
done
finish

#!/usr/bin/env bash
# Distil a CIFAR-100 student with every method, with the weights of each method's paper.
#   bash scripts/run_cifar_distill.sh                      # resnet32x4 -> resnet8x4, every method
#   TEACHER=wrn_40_2 STUDENT=wrn_16_2 METHODS="kd crd" bash scripts/run_cifar_distill.sh --amp bf16
#   DRY_RUN=1 bash scripts/run_cifar_distill.sh            # print the commands only
# Extra arguments are passed to every train_student.py command. The teacher is read from
# save/models/${TEACHER}_vanilla/ckpt_epoch_240.pth (RepDistiller's layout) unless PATH_T is set.
set -euo pipefail
cd "$(dirname "$0")/.."

TEACHER=${TEACHER:-resnet32x4}
STUDENT=${STUDENT:-resnet8x4}
TRIAL=${TRIAL:-1}
PATH_T=${PATH_T:-./save/models/${TEACHER}_vanilla/ckpt_epoch_240.pth}
PYTHON=${PYTHON:-python}
METHODS=${METHODS:-"kd hint attention similarity correlation vid rkd pkt abound factor fsp nst crd crd+kd wcord+kd crcd dcd dcd+kd dkd"}

# method -> train_student.py flags (RepDistiller's scripts for the classic methods; each paper's for the others)
flags_for() {
  case "$1" in
    kd)          echo "--distill kd -r 0.1 -a 0.9 -b 0" ;;
    hint)        echo "--distill hint -a 0 -b 100" ;;
    attention)   echo "--distill attention -a 0 -b 1000" ;;
    similarity)  echo "--distill similarity -a 0 -b 3000" ;;
    correlation) echo "--distill correlation -a 0 -b 0.02" ;;
    vid)         echo "--distill vid -a 0 -b 1" ;;
    rkd)         echo "--distill rkd -a 0 -b 1" ;;
    pkt)         echo "--distill pkt -a 0 -b 30000" ;;
    abound)      echo "--distill abound -a 0 -b 1" ;;
    factor)      echo "--distill factor -a 0 -b 200" ;;
    fsp)         echo "--distill fsp -a 0 -b 50" ;;
    nst)         echo "--distill nst -a 0 -b 50" ;;
    crd)         echo "--distill crd -a 0 -b 0.8" ;;
    crd+kd)      echo "--distill crd -a 1 -b 0.8" ;;
    wcord+kd)    echo "--distill wcord -a 1 -b 0.8" ;;
    crcd)        echo "--distill crcd -a 0.9 -b 1" ;;
    dcd)         echo "--distill dcd -a 0 -b 1" ;;
    dcd+kd)      echo "--distill dcd -a 1 -b 1" ;;
    dkd)         echo "--distill dkd -a 0 -b 1" ;;
    *) echo "unknown method '$1'" >&2; return 1 ;;
  esac
}

for method in $METHODS; do
  flags=$(flags_for "$method")
  cmd="$PYTHON train_student.py --path_t $PATH_T --model_s $STUDENT $flags --trial $TRIAL $*"
  if [ -n "${DRY_RUN:-}" ]; then
    echo "$cmd"
  else
    echo "+ $cmd"
    $cmd
  fi
done

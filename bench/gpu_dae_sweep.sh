#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: denoising U-Net (the default's method) variants trained
# side by side on one GPU, each for the same wall-clock budget and on the same training/validation
# split (--split-seed), so that replicas can be averaged into an ensemble calibrated on the same
# held-out series. Every run ends annealed (--lr-decay-fraction). Each checkpoint is copied to
# OUTDIR as soon as its run ends, so a run cut short still returns the finished ones.
# Usage: bench/gpu_dae_sweep.sh SLICES.npz OUTDIR BUDGET_S
#   JOBS overrides the variants: "name:seed:base_channels:noise_std:noise_res ..." (at most 7:
#   a lent machine returns 8 files, the last one is train.log).
# Then score each on the development set here (see model/weights/MODEL_CARD.md).
set -u
SLICES=$1; OUTDIR=$2; BUDGET=$3
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_dae_sweep}
mkdir -p "$OUTDIR" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
# default: three replicas of the shipped configuration (U-Net 16, noise 0.3 @ 16x16) with other
# training seeds, two replicas of a wider U-Net (32), and a stronger noise (0.4)
JOBS=${JOBS:-"r1:1001:16:0.3:16 r2:1002:16:0.3:16 r3:1003:16:0.3:16 w1:1001:32:0.3:16 w2:1002:32:0.3:16 n1:1001:16:0.4:16"}
run() {  # name seed base_channels noise_std noise_res
  local name=$1 seed=$2 ch=$3 std=$4 res=$5
  $PY -m triage_model.train "$WORK/$name.pt" --method dae --slices "$SLICES" --split-seed 1000 \
      --seed "$seed" --base-channels "$ch" --noise-std "$std" --noise-res "$res" \
      --steps 60000 --batch-size 32 --device auto --threads 2 --time-budget "$BUDGET" \
      --lr-decay-fraction 0.15 > "$WORK/$name.log" 2>&1
  local rc=$?
  [ -f "$WORK/$name.pt" ] && cp "$WORK/$name.pt" "$OUTDIR/$name.pt"
  echo "[$name] exit $rc: $(tail -1 "$WORK/$name.log")"
}
for j in $JOBS; do
  IFS=: read -r name seed ch std res <<< "$j"
  run "$name" "$seed" "$ch" "$std" "$res" &
done
wait
for j in $JOBS; do
  name=${j%%:*}
  echo "== $name"; grep -v "^\s*$" "$WORK/$name.log" | tail -4
done > "$OUTDIR/train.log" 2>&1
cat "$OUTDIR/train.log"
ls -la "$OUTDIR"

#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (PyTorch + NumPy there, no DICOM stack):
#   1. bench/gpu_check.py alone (AMP training steps, inference throughput) -> $OUT/gpu_check.json
#   2. the default's method (dae) and every learned baseline trained side by side on the same
#      GPU, each for the same wall-clock budget (methods with pretraining give it its share), from
#      a slice archive written here by `triage-agent train --synthetic N --export-slices`.
# At most 8 files come back from a lent machine: gpu_check.json, train.log and six checkpoints.
# Then evaluate them here with `triage-agent evaluate --model ...` (see model/weights/MODEL_CARD.md).
# Usage: bench/gpu_train.sh SLICES.npz OUTDIR BUDGET_S [STEPS]
#   MORE_SLICES="a.npz b.npz" adds training-only archives (python -m triage_model.train --more-slices);
#   the validation series still come from SLICES alone.
set -u
SLICES=$1; OUTDIR=$2; BUDGET=$3; STEPS=${4:-40000}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR" /tmp/gpu_train
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
timeout 150 $PY bench/gpu_check.py --json "$OUTDIR/gpu_check.json" 2>&1 | tail -25
# every run ends annealed: the last 15 % of its steps or of the budget, whichever comes first,
# lowers the learning rate to 0 (the bundled weights had to be annealed afterwards on a CPU)
common=(--slices "$SLICES" --steps "$STEPS" --batch-size 32 --seed 1000 --device auto
        --threads 2 --time-budget "$BUDGET" --lr-decay-fraction 0.15)
# shellcheck disable=SC2206  # MORE_SLICES is a space-separated list of files
[ -n "${MORE_SLICES:-}" ] && common+=(--more-slices ${MORE_SLICES})
run() {  # name method [extra args]
  local name=$1 method=$2; shift 2
  $PY -m triage_model.train "/tmp/gpu_train/$name.pt" --method "$method" "${common[@]}" "$@" \
      > "/tmp/gpu_train/$name.log" 2>&1
  echo "[$name] exit $?"; tail -2 "/tmp/gpu_train/$name.log"
}
# the shipped default's configuration, and every learned baseline on the same data and budget
run dae dae --noise-std 0.3 --noise-res 16 &
run vae vae &
run multitask multitask &
run cevae cevae &
run vae_pretrained vae_pretrained &
run geometry_only geometry_only &
wait
for n in dae vae multitask cevae vae_pretrained geometry_only; do
  [ -f "/tmp/gpu_train/$n.pt" ] && cp "/tmp/gpu_train/$n.pt" "$OUTDIR/$n.pt"
  echo "== $n"; grep -v "^\s*$" "/tmp/gpu_train/$n.log" | tail -5
done > "$OUTDIR/train.log" 2>&1
cat "$OUTDIR/train.log"
ls -la "$OUTDIR"

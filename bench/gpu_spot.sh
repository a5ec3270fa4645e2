#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (thirteenth session): eight U-Net members trained side
# by side with bench/gpu_spot.py for the same wall-clock budget. B0-B3 fine-tune the four bundled
# members with coarse noise + small spots (the eleventh session's recipe, far more steps);
# S0-S3 train the same architecture from scratch on that corruption. The members are packed two
# to a file (OUTDIR/B01.pt, B23.pt, S01.pt, S23.pt, 10.3 MB each: a lent machine returns at most
# 8 files of at most 16 MB, and the thirteenth session's four-member files, 20.7 MB, did not come
# back); a member whose final save is missing falls back to its half-budget copy. Logs in
# OUTDIR/train.log. Each member's state is {"cfg", "state_dict", "steps", recipe...}.
# Usage: bench/gpu_spot.sh SLICES.npz OUTDIR BUDGET_S
set -u
SLICES=$1; OUTDIR=$2; BUDGET=$3
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_spot}
mkdir -p "$OUTDIR" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
JOBS=${JOBS:-"B0:bundled:0:5342 B1:bundled:1:5343 B2:bundled:2:5344 B3:bundled:3:5345 S0:scratch:0:1000 S1:scratch:1:1001 S2:scratch:2:1002 S3:scratch:3:1003"}
for j in $JOBS; do
  IFS=: read -r name init member seed <<< "$j"
  $PY bench/gpu_spot.py "$WORK/$name.pt" --slices "$SLICES" --member "$member" --init "$init" \
      --seed "$seed" --budget "$BUDGET" ${EXTRA:-} > "$WORK/$name.log" 2>&1 &
done
wait
$PY - "$WORK" "$OUTDIR" <<'PYEOF'
import sys, torch
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
for cand in sorted({p.name[0] for p in work.glob("*.log")}):
    for pair in ("01", "23"):
        members = {}
        for k in pair:
            p = work / f"{cand}{k}.pt"
            p = p if p.exists() else p.with_suffix(".half")
            if p.exists():
                members[int(k)] = torch.load(p, weights_only=False)
                print(f"{cand}{k}: {p.name}, {members[int(k)]['steps']} steps")
        if members:
            torch.save({"members": members}, out / f"{cand}{pair}.pt")
PYEOF
for f in "$WORK"/*.log; do echo "== $f"; tail -3 "$f"; done > "$OUTDIR/train.log" 2>&1
cat "$OUTDIR/train.log"; ls -la "$OUTDIR"

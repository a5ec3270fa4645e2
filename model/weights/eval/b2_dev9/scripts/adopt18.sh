#!/bin/bash
# after RULE18 says ADOPT TAG: build + calibrate, then the test evaluation of the new default alone
set -e
TAG=$1
cd /work/runs/s14
THREADS=${THREADS:-2} /work/main/.venv/bin/python /work/runs/s13/build17.py /work/runs/s14/detector_$TAG.pt $TAG > build_$TAG.log 2>&1
cd /work/main && /usr/bin/time -v .venv/bin/triage-agent evaluate --synthetic-normals 60 --synthetic-abnormals 66 --seed 2000 \
   --matrix 512 --model /work/runs/s14/detector_$TAG.pt --primary dae --out /work/runs/s14/eval_test_$TAG \
   --cache /work/runs/cache --threads 2 --no-progress > /work/runs/s14/eval_test_$TAG.log 2>&1
echo done > /work/runs/s14/adopt_$TAG.done

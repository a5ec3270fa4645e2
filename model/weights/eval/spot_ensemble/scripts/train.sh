#!/bin/bash
cd /work/main
for k in 1 2 3; do
  .venv/bin/python bench/spot_pilot.py /work/runs/s11/N$k.pt --member $k --steps 1000 --lr 5e-4 --weight 20 --threads 2 --seed $((4242+k)) --cache /work/runs/cache > /work/runs/s11/N$k.log 2>&1
done
echo trained > /work/runs/s11/train.done

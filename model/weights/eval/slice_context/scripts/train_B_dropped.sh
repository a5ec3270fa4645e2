#!/bin/bash
# s12: a second spot fine-tune cycle, 500 steps per member, from the bundled (already spot-tuned) members
cd /work/main
for k in 0 1 2 3; do
  .venv/bin/python bench/spot_pilot.py /work/runs/s12/C$k.pt --member $k --steps 500 --lr 5e-4 --weight 20 --threads 2 --seed $((5242+k)) --cache /work/runs/cache > /work/runs/s12/C$k.log 2>&1
done
echo trained > /work/runs/s12/train.done

# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s13: export the bundled members' 128 training normals (split seed 1000) for the GPU run."""
import sys, numpy as np
from pathlib import Path
sys.path.insert(0, "/work/main")
from triage_agent.commands.train import cases_to_slices
from triage_agent.inference import synthetic_cases
train, val = cases_to_slices(synthetic_cases(160, 0, 1000, cache_dir=Path("/work/runs/cache"))).split(0.2, 1000)
print(len(train), len(val), train.x.dtype, train.x.shape, train.brain.dtype)
x = np.round(train.x * 255).astype(np.uint8)   # window units x 255 (0.31 HU steps)
print("max quant err", np.abs(x / 255 - train.x).max())
np.savez_compressed("/work/main/.gpudata13/train128.npz", x=x, brain=np.packbits(train.brain.astype(bool)), shape=np.array(train.x.shape))

# ruff: noqa -- research script of the fourteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s14: per-slice residual statistic (shipped scoring: sigma 1.5, top-q 0.001) + slice geometry, for fast exploration.
python stats.py OUT.npz CACHE.npz"""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat
torch.set_num_threads(1)
out, path = sys.argv[1], sys.argv[2]
z = np.load(path); shape = tuple(z["shape"]); n = int(np.prod(shape))
brain = np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape)
cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
r = []
for j in range(0, shape[0], 256):
    x = torch.from_numpy(z["x"][j:j+256].astype(np.float32)); rec = torch.from_numpy(z["rec"][j:j+256].astype(np.float32)); m = torch.from_numpy(brain[j:j+256])
    r.append(masked_stat(residual_map(x, rec, m, cfg), m, cfg))
r = torch.cat(r).numpy().astype(np.float64)
series = z["series"]; idx = np.zeros(len(series), int); nsl = np.zeros(len(series), int)
for i in np.unique(series):
    w = np.where(series == i)[0]; idx[w] = np.arange(len(w)); nsl[w] = len(w)
np.savez(out, r=r, area=brain.reshape(shape[0], -1).sum(1), series=series, idx=idx, nsl=nsl,
         slice_lesion=z["slice_lesion"], meta=z["meta"])
print("done", out, shape)

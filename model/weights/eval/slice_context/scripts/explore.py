# ruff: noqa -- research script of the twelfth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s12 exploration on dev6 (already spent as a judging set) with the bundled spot ensemble's cached
reconstructions (rec_new in /work/runs/s11/{val,dev6}.npz). python explore.py"""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat
from sklearn.metrics import roc_auc_score
torch.set_num_threads(1)

def load(name):
    z = np.load(f"/work/runs/s11/{name}.npz")
    shape = tuple(z["shape"]); n = int(np.prod(shape))
    return dict(x=z["x"], rec=z["rec_new"],
                brain=np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape),
                series=z["series"], slice_lesion=z["slice_lesion"], meta=json.loads(str(z["meta"])))

def stat(d, cfg, bs=256):
    out = []
    for j in range(0, len(d["x"]), bs):
        x = torch.from_numpy(d["x"][j:j+bs].astype(np.float32)); r = torch.from_numpy(d["rec"][j:j+bs].astype(np.float32)); m = torch.from_numpy(d["brain"][j:j+bs])
        out.append(masked_stat(residual_map(x, r, m, cfg), m, cfg))
    return torch.cat(out).numpy().astype(np.float64)

def nbr(d, s, w):
    o = s.copy()
    for i in np.unique(d["series"]):
        idx = np.where(d["series"] == i)[0]; v = s[idx]
        p = np.r_[v[:1], v[:-1]]; n = np.r_[v[1:], v[-1:]]
        o[idx] = (v + w * (p + n)) / (1 + 2 * w)
    return o

def agg(d, s, how):
    out = []
    for i in range(len(d["meta"])):
        v = np.sort(s[d["series"] == i])[::-1]
        out.append(v[0] if how == 1 else v[:how].mean())
    return np.array(out)

v, d = load("val"), load("dev6")
y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
for sig in (1.0, 1.5):
    for q in (0.0005, 0.001, 0.002):
        cfg = ScoringConfig(smooth_sigma=sig, rec_q=q, flip_tta=True)
        rv, r = stat(v, cfg), stat(d, cfg)
        z = (r - rv.mean()) / rv.std()
        line = f"sigma {sig} q {q}: slice {roc_auc_score(d['slice_lesion'], z):.3f} series max {roc_auc_score(y, agg(d, z, 1)):.3f} top2 {roc_auc_score(y, agg(d, z, 2)):.3f} top3 {roc_auc_score(y, agg(d, z, 3)):.3f}"
        for w in (0.25, 0.5):
            zn = nbr(d, z, w)
            line += f" | nbr{w}: slice {roc_auc_score(d['slice_lesion'], zn):.3f} series {roc_auc_score(y, agg(d, zn, 1)):.3f}"
        print(line, flush=True)

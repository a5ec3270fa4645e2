# ruff: noqa -- research script of the twelfth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""Post-decision (RULE16) exploration on dev7 (spent): series aggregation, and the thresholds from
152 normals (32 val + dev6's 120). python post7.py"""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat, apply_slice_context
from sklearn.metrics import roc_auc_score
torch.set_num_threads(1)

def load(path, key="rec"):
    z = np.load(path)
    shape = tuple(z["shape"]); n = int(np.prod(shape))
    return dict(x=z["x"], rec=z[key], brain=np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape),
                series=z["series"], slice_lesion=z["slice_lesion"], meta=json.loads(str(z["meta"])))

def stat(d, cfg, bs=256):
    out = []
    for j in range(0, len(d["x"]), bs):
        x = torch.from_numpy(d["x"][j:j+bs].astype(np.float32)); r = torch.from_numpy(d["rec"][j:j+bs].astype(np.float32)); m = torch.from_numpy(d["brain"][j:j+bs])
        out.append(masked_stat(residual_map(x, r, m, cfg), m, cfg))
    return torch.cat(out).numpy().astype(np.float64)

def agg(series, s, k):
    return np.array([np.sort(s[series == i])[::-1][:k].mean() for i in np.unique(series)])

cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
v, d6, d = load("/work/runs/s12/val_bundled.npz"), load("/work/runs/s11/dev6.npz", "rec_new"), load("/work/runs/s12/dev7_bundled.npz")
y6 = np.array([m["label"] != "normal" for m in d6["meta"]]); y = np.array([m["label"] != "normal" for m in d["meta"]])
rv0, r60, r0 = stat(v, cfg), stat(d6, cfg), stat(d, cfg)
n6 = np.isin(d6["series"], np.flatnonzero(~y6))
for w in (0.0, 0.5):
    rv, r6, r = (apply_slice_context(a, w, s["series"]).astype(np.float64) for a, s in ((rv0, v), (r60, d6), (r0, d)))
    big = np.r_[rv, r6[n6]]; bser = np.r_[v["series"], 1000 + d6["series"][n6]]
    for tag, ref, rser in (("32 val", rv, v["series"]), ("152 normals", big, bser)):
        mu, sd = ref.mean(), ref.std(); z = (r - mu) / sd; zr = (ref - mu) / sd
        line = f"w {w} norm+thr from {tag:11s}: slice {roc_auc_score(d['slice_lesion'], z):.3f}"
        for k in (1, 2, 3):
            thr = np.quantile(agg(rser, zr, k), 0.95); ss = agg(d["series"], z, k)
            line += f" | top{k} AUROC {roc_auc_score(y, ss):.3f} thr {thr:.2f} spec {(ss[~y] < thr).mean():.3f} sens {(ss[y] >= thr).mean():.3f}"
        print(line, flush=True)

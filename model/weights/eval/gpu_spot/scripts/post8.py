# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s13, after the RULE17 verdict (exploration on the now-spent dev8, not a judgement):
slice context and top-3 aggregation on B/B2, and paired bootstrap intervals of the differences."""
import sys
import numpy as np, torch
sys.path.insert(0, "/work/runs/s13"); sys.path.insert(0, "/work/main")
sys.argv = ["j17.py", "dev8"]
from model.scoring import ScoringConfig, apply_slice_context
from sklearn.metrics import roc_auc_score
import importlib.util
spec = importlib.util.spec_from_file_location("j", "/work/runs/s13/j17.py")
src = open("/work/runs/s13/j17.py").read().split("name = sys.argv[1]")[0]
ns = {}; exec(src, ns)
load, stat, series_max = ns["load"], ns["stat"], ns["series_max"]
cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
out = {}
for tag in ["bundled", "B", "B2"]:
    v = load("/work/runs/s12/val_bundled.npz" if tag == "bundled" else f"/work/runs/s13/val_{tag}.npz")
    d = load(f"/work/runs/s13/dev8_{tag}.npz")
    y = np.array([m["label"] != "normal" for m in d["meta"]])
    rv0, r0 = stat(v, cfg), stat(d, cfg)
    for w in (0.0, 0.5):
        rv, r = apply_slice_context(rv0, w, v["series"]).astype(np.float64), apply_slice_context(r0, w, d["series"]).astype(np.float64)
        z = (r - rv.mean()) / rv.std()
        smax = series_max(d, z)
        top3 = np.array([np.sort(z[d["series"] == i])[-3:].mean() for i in range(len(d["meta"]))])
        out[(tag, w)] = (smax, top3, z)
        print(f"{tag:8s} w{w}: series max {roc_auc_score(y, smax):.3f} top3 {roc_auc_score(y, top3):.3f} slice {roc_auc_score(d['slice_lesion'], z):.3f}", flush=True)
rng = np.random.default_rng(0)
def boot(a, b):
    diffs = []
    for _ in range(2000):
        i = rng.integers(0, len(y), len(y))
        if y[i].all() or (~y[i]).all(): continue
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    return np.mean(diffs), np.quantile(diffs, [0.025, 0.975])
for tag in ["B", "B2"]:
    m, (lo, hi) = boot(out[(tag, 0.0)][0], out[("bundled", 0.0)][0])
    print(f"series AUROC {tag} - bundled (max, w0): {m:+.3f}, bootstrap 95 % [{lo:+.3f}, {hi:+.3f}] over series")
m, (lo, hi) = boot(out[("B2", 0.5)][0], out[("bundled", 0.0)][0])
print(f"series AUROC B2 w0.5 - bundled w0 (max): {m:+.3f} [{lo:+.3f}, {hi:+.3f}]")

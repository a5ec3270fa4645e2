# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s13, after the RULE17 verdict (exploration, decides nothing): B2 against the shipped file on the
spent dev7 (which B2 has never been looked at on), and dev7 + dev8 pooled, with paired bootstraps."""
import sys
import numpy as np
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, apply_slice_context
from sklearn.metrics import roc_auc_score
src = open("/work/runs/s13/j17.py").read().split("name = sys.argv[1]")[0]
ns = {}; exec(src, ns)
load, stat, series_max = ns["load"], ns["stat"], ns["series_max"]
cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
V = {"bundled": "/work/runs/s12/val_bundled.npz", "B2": "/work/runs/s13/val_B2.npz"}
D = {("dev7", "bundled"): "/work/runs/s12/dev7_bundled.npz", ("dev7", "B2"): "/work/runs/s13/dev7_B2.npz",
     ("dev8", "bundled"): "/work/runs/s13/dev8_bundled.npz", ("dev8", "B2"): "/work/runs/s13/dev8_B2.npz"}
S, Y = {}, {}
for (ds, tag), path in D.items():
    v, d = load(V[tag]), load(path)
    y = np.array([m["label"] != "normal" for m in d["meta"]]); Y[ds] = y
    rv0, r0 = stat(v, cfg), stat(d, cfg)
    for w in (0.0, 0.5):
        rv, r = apply_slice_context(rv0, w, v["series"]), apply_slice_context(r0, w, d["series"])
        z = (r - rv.mean()) / rv.std(); zv = (rv - rv.mean()) / rv.std()
        thr = np.quantile(series_max(v, zv), 0.95); ss = series_max(d, z)
        S[(ds, tag, w)] = ss
        print(f"{ds} {tag:8s} w{w}: series {roc_auc_score(y, ss):.3f} slice {roc_auc_score(d['slice_lesion'], z):.3f} spec {(ss[~y] < thr).mean():.3f} sens {(ss[y] >= thr).mean():.3f}", flush=True)
rng = np.random.default_rng(0)
def boot(sets, a_key, b_key, n=2000):
    diffs = []
    for _ in range(n):
        tot = 0.0
        for ds in sets:
            y = Y[ds]; i = rng.integers(0, len(y), len(y))
            tot += roc_auc_score(y[i], S[(ds,) + a_key][i]) - roc_auc_score(y[i], S[(ds,) + b_key][i])
        diffs.append(tot / len(sets))
    return np.mean(diffs), np.quantile(diffs, [0.025, 0.975])
for sets in (["dev7"], ["dev8"], ["dev7", "dev8"]):
    for a_key in (("B2", 0.0), ("B2", 0.5)):
        m, (lo, hi) = boot(sets, a_key, ("bundled", 0.0))
        print(f"series AUROC {a_key[0]} w{a_key[1]} - bundled w0 on {'+'.join(sets)} (mean of per-set differences): {m:+.3f}, 95 % [{lo:+.3f}, {hi:+.3f}]", flush=True)

# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s15: exploration on SPENT sets (dev7, dev8, dev9): shipped vs B2, with/without slice context, max vs top-k."""
import json, numpy as np
from sklearn.metrics import roc_auc_score
S = "/work/runs/s14"
def ctx(r, series, w):
    if w == 0: return r
    out = r.copy()
    for i in np.unique(series):
        ix = np.where(series == i)[0]; s = r[ix]
        prev = np.r_[s[0], s[:-1]]; nxt = np.r_[s[1:], s[-1]]
        out[ix] = (s + w * (prev + nxt)) / (1 + 2 * w)
    return out
def agg(series, s, k):
    return np.array([np.sort(s[series == i])[::-1][:k].mean() for i in np.unique(series)])
for ds in ["dev7", "dev8", "dev9"]:
    print("==", ds)
    for tag in ["bundled", "B2"]:
        v = dict(np.load(f"{S}/st_val_{tag}.npz")); d = dict(np.load(f"{S}/st_{ds}_{tag}.npz"))
        meta = json.loads(str(d["meta"])); y = np.array([m["label"] != "normal" for m in meta]); sub = np.array([m["subtle"] for m in meta])
        for w in [0, 0.5]:
            vr = ctx(v["r"], v["series"], w); dr = ctx(d["r"], d["series"], w)
            mu, sd = vr.mean(), vr.std(); z = (dr - mu) / sd
            sl = roc_auc_score(d["slice_lesion"], z)
            for k in [1, 2, 3]:
                ss = agg(d["series"], z, k)
                t95 = np.quantile(ss[~y], 0.95); s95 = (ss[y] > t95).mean()
                t90 = np.quantile(ss[~y], 0.90); s90 = (ss[y] > t90).mean()
                subA = roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((y & sub).sum())], np.r_[ss[~y], ss[y & sub]])
                print(f"{tag:8s} w={w:.1f} top{k}: series {roc_auc_score(y, ss):.3f} slice {sl:.3f} subtle {subA:.3f} sens@95spec {s95:.3f} sens@90spec {s90:.3f}")

# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s15 exploration (SPENT sets), mirroring the planned build: atlas (NB 16, sigma 1.5, eps 0.002) from the normals of two
spent sets, z-normalisation and threshold (95th pct of series max) on 152 normals (val 32 + dev6 120), scored on a third."""
import sys, numpy as np
sys.path.insert(0, "/work/runs/s15")
from atl import L, build, score, smax, roc_auc_score
NB, SIG, EPS = 16, 1.5, 0.002
V = L("val"); A6 = L("a6"); A7 = L("a7")
full = {k: L(k) for k in ["dev8", "dev9"]}
nor = {k: L(k, True) for k in ["dev8", "dev9"]}
for ev, other in [("dev8", "dev9"), ("dev9", "dev8")]:
    d = full[ev]; y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
    for tag, nb in [("shipped", 0), ("atlas", NB)]:
        mu = sd = None
        if nb: mu, sd = build([A7, nor[other]], nb, SIG)
        rv, r6, rd = score(V, nb, mu, sd, EPS), score(A6, nb, mu, sd, EPS), score(d, nb, mu, sd, EPS)
        cal = np.r_[rv, r6]; m_, s_ = cal.mean(), cal.std()
        cm = np.r_[smax(V["series"], (rv - m_) / s_), smax(A6["series"], (r6 - m_) / s_)]; assert len(cm) == 152
        thr = np.quantile(cm, 0.95); zz = (rd - m_) / s_; ss = smax(d["series"], zz)
        t95 = np.quantile(ss[~y], 0.95)
        subA = roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((y & sub).sum())], np.r_[ss[~y], ss[y & sub]])
        print(f"{ev} {tag:8s} (atlas from dev7+{other} normals) series {roc_auc_score(y, ss):.3f} slice {roc_auc_score(d['sl'], zz):.3f} "
              f"subtle {subA:.3f} | thr152 {thr:.2f}: spec {(ss[~y] < thr).mean():.3f} sens {(ss[y] >= thr).mean():.3f} | sens@own95 {(ss[y] > t95).mean():.3f}", flush=True)

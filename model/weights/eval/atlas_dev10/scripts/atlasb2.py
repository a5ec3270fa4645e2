# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s15, after RULE19's verdict (decides nothing; spent sets only): the atlas on B2's residuals. Leave-one-out as atlas3:
atlas from dev7 + the other set's normals; z on the 32 validation series; calibration-free figures only."""
import sys, numpy as np
sys.path.insert(0, "/work/runs/s15")
from atl import L, build, score, smax, roc_auc_score
NB, SIG, EPS = 16, 1.5, 0.002
for tag, pre in [("bundled", ""), ("B2", "b")]:
    V = L(pre + "val" if pre else "val"); A7 = L(pre + "7" if pre else "a7")
    full = {k: L(pre + k[-1] if pre else k) for k in ["dev8", "dev9"]}
    nor = {k: L(pre + k[-1] if pre else k, True) for k in ["dev8", "dev9"]}
    for ev, other in [("dev8", "dev9"), ("dev9", "dev8")]:
        d = full[ev]; y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
        for at, nb in [("plain", 0), ("atlas", NB)]:
            mu = sd = None
            if nb: mu, sd = build([A7, nor[other]], nb, SIG)
            rv, rd = score(V, nb, mu, sd, EPS), score(d, nb, mu, sd, EPS)
            m_, s_ = rv.mean(), rv.std(); zz = (rd - m_) / s_; ss = smax(d["series"], zz)
            t95 = np.quantile(ss[~y], 0.95)
            subA = roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((y & sub).sum())], np.r_[ss[~y], ss[y & sub]])
            print(f"{ev} {tag:8s} {at:6s} series {roc_auc_score(y, ss):.3f} slice {roc_auc_score(d['sl'], zz):.3f} subtle {subA:.3f} sens@own95 {(ss[y] > t95).mean():.3f}", flush=True)

# ruff: noqa -- research script of the fourteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
import json, numpy as np
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
def L(t):
    z = dict(np.load(f"st_{t}.npz")); z["meta"] = json.loads(str(z["meta"])); return z
def per_series(d, s, f): return np.array([f(s[d["series"] == i]) for i in range(len(d["meta"]))])
for tag in ["bundled", "B2"]:
    v = L(f"val_{tag}"); mu, sd = v["r"].mean(), v["r"].std()
    vrel = v["idx"] / v["nsl"]; zv = (v["r"] - mu) / sd
    edges = np.linspace(0, 1, 6)[1:-1]; vb = np.digitize(vrel, edges)
    pm = np.array([zv[vb == k].mean() for k in range(5)]); ps = np.array([zv[vb == k].std() for k in range(5)])
    if tag == "bundled": print("val pos-bin mean", pm.round(2), "sd", ps.round(2))
    vmax = per_series(v, zv, np.max); vn = np.array([m["n"] for m in v["meta"]])
    slope = np.polyfit(np.log(vn), vmax, 1)[0]
    for ds in ["dev7", "dev8"]:
        d = L(f"{ds}_{tag}"); y = np.array([m["label"] != "normal" for m in d["meta"]])
        z = (d["r"] - mu) / sd; n = np.array([m["n"] for m in d["meta"]])
        base = per_series(d, z, np.max)
        out = [f"max {roc_auc_score(y, base):.3f}"]
        sid = -np.log1p(-norm.cdf(base) ** n + 1e-300)  # Sidak with Gaussian tail
        out.append(f"sidak {roc_auc_score(y, n * norm.sf(base) * -1):.3f}")
        for a in [0.5, 1.0, 1.5]:
            out.append(f"max-{a}log n {roc_auc_score(y, base - a * np.log(n)):.3f}")
        out.append(f"valslope({slope:.2f}) {roc_auc_score(y, base - slope * np.log(n)):.3f}")
        db = np.digitize(d["idx"] / d["nsl"], edges); zp = (z - pm[db]) / ps[db]
        out.append(f"posnorm {roc_auc_score(y, per_series(d, zp, np.max)):.3f} slice {roc_auc_score(d['slice_lesion'], zp):.3f}")
        t3 = per_series(d, z, lambda a: np.sort(a)[-3:].mean())
        out.append(f"top3 {roc_auc_score(y, t3):.3f}")
        print(tag, ds, " | ".join(out))

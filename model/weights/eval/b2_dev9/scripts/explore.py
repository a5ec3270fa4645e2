# ruff: noqa -- research script of the fourteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
import json, numpy as np
from sklearn.metrics import roc_auc_score
def L(t): 
    z = dict(np.load(f"st_{t}.npz")); z["meta"] = json.loads(str(z["meta"])); return z
def smax(d, s): return np.array([s[d["series"] == i].max() for i in range(len(d["meta"]))])
for tag in ["bundled", "B2"]:
    v = L(f"val_{tag}")
    mu, sd = v["r"].mean(), v["r"].std()
    for ds in ["dev7", "dev8"]:
        d = L(f"{ds}_{tag}"); y = np.array([m["label"] != "normal" for m in d["meta"]])
        z = (d["r"] - mu) / sd; ss = smax(d, z)
        print(tag, ds, "series %.3f slice %.3f" % (roc_auc_score(y, ss), roc_auc_score(d["slice_lesion"], z)))
        if tag == "bundled" and ds == "dev8":
            am = np.array([np.where(d["series"] == i)[0][np.argmax(z[d["series"] == i])] for i in range(len(y))])
            rel = d["idx"][am] / d["nsl"][am]
            print(" normal argmax rel pos hist", np.histogram(rel[~y], bins=10, range=(0, 1))[0])
            print(" abn argmax rel pos hist   ", np.histogram(rel[y], bins=10, range=(0, 1))[0])
            ar = d["area"][am]
            print(" normal argmax area pct", np.percentile(ar[~y], [10, 25, 50, 75, 90]).round())
            print(" abn argmax area pct   ", np.percentile(ar[y], [10, 25, 50, 75, 90]).round())
            print(" all slices area pct   ", np.percentile(d["area"], [10, 25, 50, 75, 90]).round())
            # residual vs area in val normals
            bins = np.percentile(v["area"], np.linspace(0, 100, 11))
            b = np.digitize(v["area"], bins[1:-1])
            print(" val mean z by area decile", [round(float(((v["r"][b == k] - mu) / sd).mean()), 2) for k in range(10)])
            print(" val sd z by area decile", [round(float(((v["r"][b == k] - mu) / sd).std()), 2) for k in range(10)])
            bd = np.digitize(d["area"], bins[1:-1]); n = ~d["slice_lesion"].astype(bool) & np.isin(d["series"], np.where(~y)[0])
            print(" dev8 normal-series mean z by area decile", [round(float(z[n & (bd == k)].mean()), 2) for k in range(10)])
            print(" nsl normal corr with series max", np.corrcoef(d["nsl"][am][~y], ss[~y])[0, 1])

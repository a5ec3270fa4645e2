# ruff: noqa -- research script of the eleventh session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""RULE15 judgement: python j15.py dev6   (val and the set from /work/runs/s11/*.npz)"""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat
from sklearn.metrics import roc_auc_score

def load(name):
    z = np.load(f"/work/runs/s11/{name}.npz")
    shape = tuple(z["shape"]); n = int(np.prod(shape))
    return dict(x=z["x"].astype(np.float32), rec=z["rec"].astype(np.float32), rec_new=z["rec_new"].astype(np.float32),
                brain=np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape),
                series=z["series"], slice_lesion=z["slice_lesion"], meta=json.loads(str(z["meta"])))

def stat(d, key, cfg, bs=512):
    out = []
    for j in range(0, len(d["x"]), bs):
        x = torch.from_numpy(d["x"][j:j+bs]); r = torch.from_numpy(d[key][j:j+bs]); m = torch.from_numpy(d["brain"][j:j+bs])
        out.append(masked_stat(residual_map(x, r, m, cfg), m, cfg))
    return torch.cat(out).numpy().astype(np.float64)

def series_score(d, s):
    return np.array([s[d["series"] == i].max() for i in range(len(d["meta"]))])

DENSE = {"aneurysm", "cavernoma", "intraparenchymal_haemorrhage", "epidural_haematoma",
         "intraventricular_haemorrhage", "subarachnoid_haemorrhage"}
v, d = load("val"), load(sys.argv[1])
y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
fam = np.array([m["label"] for m in d["meta"]]); dense = sub & np.isin(fam, list(DENSE))
def grp(ss, g): return roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones(g.sum())], np.r_[ss[~y], ss[g]])
print(f"{sys.argv[1]}: {len(y)} series ({y.sum()} abnormal, {sub.sum()} subtle, {dense.sum()} subtle-dense), {len(d['x'])} slices, {d['slice_lesion'].sum()} lesion slices")
res = {}
for tag, key, q in (("SHIPPED q0.003", "rec", 0.003), ("NEW q0.001 [rule]", "rec_new", 0.001), ("NEW q0.003", "rec_new", 0.003), ("SHIPPED q0.001", "rec", 0.001)):
    cfg = ScoringConfig(smooth_sigma=1.5, rec_q=q, flip_tta=True)
    rv, r = stat(v, key, cfg), stat(d, key, cfg)
    z = (r - rv.mean()) / rv.std(); zv = (rv - rv.mean()) / rv.std()
    thr = np.quantile(series_score(v, zv), 0.95); ss = series_score(d, z)
    a, b = roc_auc_score(y, ss), roc_auc_score(d["slice_lesion"], z)
    spec, sens = (ss[~y] < thr).mean(), (ss[y] >= thr).mean()
    res[tag] = (a, b, spec)
    print(f"{tag:20s} series {a:.3f} slice {b:.3f} | subtle-dense {grp(ss, dense):.3f} subtle {grp(ss, sub):.3f} non-subtle {grp(ss, y & ~sub):.3f} | thr {thr:.2f} spec {spec:.3f} sens {sens:.3f}", flush=True)
    fams = sorted(set(fam[y]))
    print("   per family AUROC: " + ", ".join(f"{f[:12]} {grp(ss, fam == f):.2f}" for f in fams))
S, N = res["SHIPPED q0.003"], res["NEW q0.001 [rule]"]
ok = N[0] >= S[0] + 0.010 and N[1] >= S[1] - 0.005 and N[2] >= S[2] - 0.03
print(f"RULE15: series {N[0]-S[0]:+.3f} (>= +0.010), slice {N[1]-S[1]:+.3f} (>= -0.005), spec {N[2]-S[2]:+.3f} (>= -0.03) => {'ADOPT' if ok else 'NOT ADOPTED'}")

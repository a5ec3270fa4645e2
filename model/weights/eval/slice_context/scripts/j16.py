# ruff: noqa -- research script of the twelfth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""RULE16 judgement: python j16.py dev7 [C]   (val_{tag}.npz and dev7_{tag}.npz from recon7.py)"""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat, apply_slice_context
from sklearn.metrics import roc_auc_score
torch.set_num_threads(2)

def load(name):
    z = np.load(f"/work/runs/s12/{name}.npz")
    shape = tuple(z["shape"]); n = int(np.prod(shape))
    return dict(x=z["x"], rec=z["rec"], brain=np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape),
                series=z["series"], slice_lesion=z["slice_lesion"], meta=json.loads(str(z["meta"])))

def stat(d, cfg, bs=256):
    out = []
    for j in range(0, len(d["x"]), bs):
        x = torch.from_numpy(d["x"][j:j+bs].astype(np.float32)); r = torch.from_numpy(d["rec"][j:j+bs].astype(np.float32)); m = torch.from_numpy(d["brain"][j:j+bs])
        out.append(masked_stat(residual_map(x, r, m, cfg), m, cfg))
    return torch.cat(out).numpy().astype(np.float64)

def series_max(d, s):
    return np.array([s[d["series"] == i].max() for i in range(len(d["meta"]))])

DENSE = {"aneurysm", "cavernoma", "intraparenchymal_haemorrhage", "epidural_haematoma",
         "intraventricular_haemorrhage", "subarachnoid_haemorrhage"}
name = sys.argv[1]
res = {}
for tag in ["bundled"] + sys.argv[2:]:
    v, d = load(f"val_{tag}"), load(f"{name}_{tag}")
    y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
    fam = np.array([m["label"] for m in d["meta"]]); dense = sub & np.isin(fam, list(DENSE))
    if tag == "bundled":
        print(f"{name}: {len(y)} series ({y.sum()} abnormal, {sub.sum()} subtle, {dense.sum()} subtle-dense), {len(d['x'])} slices, {d['slice_lesion'].sum()} lesion slices")
    def grp(ss, g): return roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones(g.sum())], np.r_[ss[~y], ss[g]])
    cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
    rv0, r0 = stat(v, cfg), stat(d, cfg)
    for w in (0.0, 0.5):
        rv, r = apply_slice_context(rv0, w, v["series"]).astype(np.float64), apply_slice_context(r0, w, d["series"]).astype(np.float64)
        z = (r - rv.mean()) / rv.std(); zv = (rv - rv.mean()) / rv.std()
        thr = np.quantile(series_max(v, zv), 0.95); ss = series_max(d, z)
        a, b = roc_auc_score(y, ss), roc_auc_score(d["slice_lesion"], z)
        spec, sens = (ss[~y] < thr).mean(), (ss[y] >= thr).mean()
        key = f"{tag} w{w}"; res[key] = (a, b, spec)
        print(f"{key:12s} series {a:.3f} slice {b:.3f} | subtle-dense {grp(ss, dense):.3f} subtle {grp(ss, sub):.3f} non-subtle {grp(ss, y & ~sub):.3f} | thr {thr:.2f} spec {spec:.3f} sens {sens:.3f}", flush=True)
        print("   per family AUROC: " + ", ".join(f"{f[:12]} {grp(ss, fam == f):.2f}" for f in sorted(set(fam[y]))))
R, A = res["bundled w0.0"], res["bundled w0.5"]
okA = A[1] >= R[1] + 0.008 and A[0] >= R[0] + 0.000 and A[2] >= R[2] - 0.03
print(f"RULE16 A: slice {A[1]-R[1]:+.3f} (>= +0.008), series {A[0]-R[0]:+.3f} (>= +0.000), spec {A[2]-R[2]:+.3f} (>= -0.03) => {'ADOPT' if okA else 'NOT ADOPTED'}")
if "C w0.0" in res:
    X = A if okA else R; B = res["C w0.5" if okA else "C w0.0"]
    okB = B[0] >= X[0] + 0.010 and B[1] >= X[1] - 0.005 and B[2] >= X[2] - 0.03
    print(f"RULE16 B (vs {'A' if okA else 'REF'}): series {B[0]-X[0]:+.3f} (>= +0.010), slice {B[1]-X[1]:+.3f} (>= -0.005), spec {B[2]-X[2]:+.3f} (>= -0.03) => {'ADOPT' if okB else 'NOT ADOPTED'}")

# ruff: noqa -- research script of the fourteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""RULE18 judgement: python j18.py   (dev9_{bundled,B2}.npz here; validation caches from s12/s13; dev7/dev8 from st_*.npz)"""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat
from sklearn.metrics import roc_auc_score
torch.set_num_threads(2)

def load(path):
    z = np.load(path)
    shape = tuple(z["shape"]); n = int(np.prod(shape))
    return dict(x=z["x"], rec=z["rec"], brain=np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape),
                series=z["series"], slice_lesion=z["slice_lesion"], meta=json.loads(str(z["meta"])))

def stat(d, cfg, bs=256):
    out = []
    for j in range(0, len(d["x"]), bs):
        x = torch.from_numpy(d["x"][j:j+bs].astype(np.float32)); r = torch.from_numpy(d["rec"][j:j+bs].astype(np.float32)); m = torch.from_numpy(d["brain"][j:j+bs])
        out.append(masked_stat(residual_map(x, r, m, cfg), m, cfg))
    return torch.cat(out).numpy().astype(np.float64)

def series_max(series, s, k):
    return np.array([s[series == i].max() for i in range(k)])

DENSE = {"aneurysm", "cavernoma", "intraparenchymal_haemorrhage", "epidural_haematoma",
         "intraventricular_haemorrhage", "subarachnoid_haemorrhage"}
VAL = {"bundled": "/work/runs/s12/val_bundled.npz", "B2": "/work/runs/s13/val_B2.npz"}
DEV = sys.argv[1] if len(sys.argv) > 1 else "/work/runs/s14/dev9_{tag}.npz"  # a dry run: /work/runs/s13/dev8_{tag}.npz
cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
res, ser = {}, {}
for tag in ["bundled", "B2"]:
    v, d = load(VAL[tag]), load(DEV.format(tag=tag))
    k = len(d["meta"])
    y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
    fam = np.array([m["label"] for m in d["meta"]]); dense = sub & np.isin(fam, list(DENSE))
    if tag == "bundled":
        print(f"dev9: {k} series ({y.sum()} abnormal, {sub.sum()} subtle, {dense.sum()} subtle-dense), {len(d['x'])} slices, {d['slice_lesion'].sum()} lesion slices")
    def grp(ss, g): return roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones(g.sum())], np.r_[ss[~y], ss[g]])
    rv, r = stat(v, cfg), stat(d, cfg)
    z = (r - rv.mean()) / rv.std(); zv = (rv - rv.mean()) / rv.std()
    thr = np.quantile(series_max(v["series"], zv, len(v["meta"])), 0.95); ss = series_max(d["series"], z, k)
    a, b = roc_auc_score(y, ss), roc_auc_score(d["slice_lesion"], z)
    spec, sens = (ss[~y] < thr).mean(), (ss[y] >= thr).mean()
    res[tag] = (a, b, spec, sens); ser[tag] = (y, ss)
    print(f"{tag:8s} series {a:.3f} slice {b:.3f} | subtle-dense {grp(ss, dense):.3f} subtle {grp(ss, sub):.3f} non-subtle {grp(ss, y & ~sub):.3f} | thr {thr:.2f} spec {spec:.3f} sens {sens:.3f}", flush=True)
    print("   per family AUROC: " + ", ".join(f"{f[:12]} {grp(ss, fam == f):.2f}" for f in sorted(set(fam[y]))))
R, X = res["bundled"], res["B2"]
ok = X[0] - R[0] >= 0.000 and X[1] - R[1] >= 0.005 and X[2] - R[2] >= -0.03
print(f"RULE18 B2: series {X[0]-R[0]:+.3f} (>= +0.000), slice {X[1]-R[1]:+.3f} (>= +0.005), spec {X[2]-R[2]:+.3f} (>= -0.03) => {'PASS' if ok else 'FAIL'}")
print(f"RULE18 verdict: {'ADOPT B2' if ok else 'nothing adopted'}", flush=True)

# descriptive only: paired bootstrap of the series difference, dev9 alone and pooled with dev7/dev8
def st_series(ds, tag):
    z = dict(np.load(f"/work/runs/s14/st_{ds}_{tag}.npz")); v = dict(np.load(f"/work/runs/s14/st_val_{tag}.npz"))
    meta = json.loads(str(z["meta"])); zz = (z["r"] - v["r"].mean()) / v["r"].std()
    return np.array([m["label"] != "normal" for m in meta]), series_max(z["series"], zz, len(meta))
sets = {"dev9": (ser["bundled"][0], ser["bundled"][1], ser["B2"][1])}
for ds in ["dev7", "dev8"]:
    (y0, s0), (y1, s1) = st_series(ds, "bundled"), st_series(ds, "B2"); assert (y0 == y1).all()
    sets[ds] = (y0, s0, s1)
rng = np.random.default_rng(18)
boot = {}
for ds, (y, s0, s1) in sets.items():
    d0 = roc_auc_score(y, s1) - roc_auc_score(y, s0); bs = []
    for _ in range(2000):
        i = rng.integers(0, len(y), len(y))
        if y[i].all() or (~y[i]).all(): continue
        bs.append(roc_auc_score(y[i], s1[i]) - roc_auc_score(y[i], s0[i]))
    boot[ds] = (d0, np.array(bs[:1990]))
    print(f"series gain {ds}: {d0:+.3f}, 95 % [{np.quantile(bs, 0.025):+.3f}, {np.quantile(bs, 0.975):+.3f}]")
pooled = np.mean([boot[k][0] for k in boot]); pb = np.mean([boot[k][1] for k in boot], 0)
print(f"series gain pooled dev7+dev8+dev9 (mean of per-set differences): {pooled:+.3f}, 95 % [{np.quantile(pb, 0.025):+.3f}, {np.quantile(pb, 0.975):+.3f}]")
json.dump({"res": res, "verdict": "B2" if ok else None, "pooled": pooled}, open("/work/runs/s14/j18_dev9.json" if len(sys.argv) == 1 else "/work/runs/s14/j18_dry.json", "w"), indent=1)

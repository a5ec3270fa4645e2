# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""RULE17 judgement: python j17.py dev8 B B2   (val_{tag}.npz / dev8_{tag}.npz; bundled from s12 val + s13 dev8)"""
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

def series_max(d, s):
    return np.array([s[d["series"] == i].max() for i in range(len(d["meta"]))])

DENSE = {"aneurysm", "cavernoma", "intraparenchymal_haemorrhage", "epidural_haematoma",
         "intraventricular_haemorrhage", "subarachnoid_haemorrhage"}
name = sys.argv[1]
res, scores = {}, {}
for tag in ["bundled"] + sys.argv[2:]:
    vpath = "/work/runs/s12/val_bundled.npz" if tag == "bundled" else f"/work/runs/s13/val_{tag}.npz"
    v, d = load(vpath), load(f"/work/runs/s13/{name}_{tag}.npz")
    y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
    fam = np.array([m["label"] for m in d["meta"]]); dense = sub & np.isin(fam, list(DENSE))
    if tag == "bundled":
        print(f"{name}: {len(y)} series ({y.sum()} abnormal, {sub.sum()} subtle, {dense.sum()} subtle-dense), {len(d['x'])} slices, {d['slice_lesion'].sum()} lesion slices")
    def grp(ss, g): return roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones(g.sum())], np.r_[ss[~y], ss[g]])
    cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
    rv, r = stat(v, cfg), stat(d, cfg)
    z = (r - rv.mean()) / rv.std(); zv = (rv - rv.mean()) / rv.std()
    thr = np.quantile(series_max(v, zv), 0.95); ss = series_max(d, z)
    a, b = roc_auc_score(y, ss), roc_auc_score(d["slice_lesion"], z)
    spec, sens = (ss[~y] < thr).mean(), (ss[y] >= thr).mean()
    res[tag] = (a, b, spec); scores[tag] = dict(series=ss.tolist(), slice=z.tolist())
    print(f"{tag:8s} series {a:.3f} slice {b:.3f} | subtle-dense {grp(ss, dense):.3f} subtle {grp(ss, sub):.3f} non-subtle {grp(ss, y & ~sub):.3f} | thr {thr:.2f} spec {spec:.3f} sens {sens:.3f}", flush=True)
    print("   per family AUROC: " + ", ".join(f"{f[:12]} {grp(ss, fam == f):.2f}" for f in sorted(set(fam[y]))))
R = res["bundled"]; passed = []
for tag in sys.argv[2:]:
    X = res[tag]
    ok = X[0] >= R[0] + 0.010 and X[1] >= R[1] - 0.005 and X[2] >= R[2] - 0.03
    print(f"RULE17 {tag}: series {X[0]-R[0]:+.3f} (>= +0.010), slice {X[1]-R[1]:+.3f} (>= -0.005), spec {X[2]-R[2]:+.3f} (>= -0.03) => {'PASS' if ok else 'FAIL'}")
    if ok: passed.append(tag)
best = max(passed, key=lambda t: res[t][0]) if passed else None
print(f"RULE17 verdict: {'ADOPT ' + best if best else 'nothing adopted'}")
json.dump({"res": res, "verdict": best}, open(f"/work/runs/s13/j17_{name}.json", "w"), indent=1)

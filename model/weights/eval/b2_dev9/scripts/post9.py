# ruff: noqa -- research script of the fourteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s14, after RULE18's verdict (decides nothing): dev9 at the product's kind of threshold (95th percentile of
152 normal series: 32 validation + dev6's 120 normals, z-normalised on the same 152), and at matched specificity."""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat
from sklearn.metrics import roc_auc_score
torch.set_num_threads(2)
cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
def stat(x, rec, brain):
    out = []
    for j in range(0, len(x), 256):
        m = torch.from_numpy(brain[j:j+256])
        out.append(masked_stat(residual_map(torch.from_numpy(x[j:j+256].astype(np.float32)), torch.from_numpy(rec[j:j+256].astype(np.float32)), m, cfg), m, cfg))
    return torch.cat(out).numpy().astype(np.float64)
def smax(series, s): return np.array([s[series == i].max() for i in np.unique(series)])
z6 = np.load("/work/runs/s11/dev6.npz"); shape = tuple(z6["shape"]); n = int(np.prod(shape))
meta6 = json.loads(str(z6["meta"])); normal = [i for i, m in enumerate(meta6) if m["label"] == "normal"]
idx = np.where(np.isin(z6["series"], normal))[0]
brain6 = np.unpackbits(z6["brain"], count=n).astype(bool).reshape(shape)[idx]; x6 = z6["x"][idx]; s6 = z6["series"][idx]
rec6 = {"bundled": z6["rec_new"][idx]}
parts = [np.load(f"/work/runs/s14/dev6n_B2.part{k}.npz") for k in (0, 1)]
rb = np.zeros_like(x6); pos = {v: j for j, v in enumerate(idx)}
for p in parts:
    rb[[pos[v] for v in p["idx"]]] = p["rec"]
rec6["B2"] = rb
res = {}
for tag in ["bundled", "B2"]:
    v = dict(np.load(f"/work/runs/s14/st_val_{tag}.npz")); d = dict(np.load(f"/work/runs/s14/st_dev9_{tag}.npz"))
    meta = json.loads(str(d["meta"])); y = np.array([m["label"] != "normal" for m in meta])
    r6 = stat(x6, rec6[tag], brain6)
    cal_r = np.r_[v["r"], r6]; mu, sd = cal_r.mean(), cal_r.std()
    cal_max = np.r_[smax(v["series"], (v["r"] - mu) / sd), smax(s6, (r6 - mu) / sd)]
    assert len(cal_max) == 152
    thr = np.quantile(cal_max, 0.95)
    ss = smax(d["series"], (d["r"] - mu) / sd)
    spec, sens = (ss[~y] < thr).mean(), (ss[y] >= thr).mean()
    t95 = np.quantile(ss[~y], 0.95); s95 = (ss[y] > t95).mean()
    res[tag] = (spec, sens, s95)
    print(f"{tag:8s} 152-normal threshold {thr:.3f}: dev9 spec {spec:.3f} sens {sens:.3f} | at dev9's own 95 % spec: sens {s95:.3f}")
    if tag == "bundled":
        print(f"   (shipped detector.pt threshold is 4.539; this recomputation {thr:.3f})")
print(f"B2 - shipped at the 152-normal threshold: spec {res['B2'][0]-res['bundled'][0]:+.3f}, sens {res['B2'][1]-res['bundled'][1]:+.3f}; at matched 95 % spec: sens {res['B2'][2]-res['bundled'][2]:+.3f}")
# specificity at the 32-series validation threshold on the other sets, for context
for ds in ["dev7", "dev8", "dev9"]:
    row = []
    for tag in ["bundled", "B2"]:
        v = dict(np.load(f"/work/runs/s14/st_val_{tag}.npz")); d = dict(np.load(f"/work/runs/s14/st_{ds}_{tag}.npz"))
        y = np.array([m["label"] != "normal" for m in json.loads(str(d["meta"]))])
        mu, sd = v["r"].mean(), v["r"].std(); thr = np.quantile(smax(v["series"], (v["r"] - mu) / sd), 0.95)
        ss = smax(d["series"], (d["r"] - mu) / sd); row.append(f"{tag} spec {(ss[~y] < thr).mean():.3f} sens {(ss[y] >= thr).mean():.3f}")
    print(f"{ds} at the 32-series validation threshold: " + " | ".join(row))

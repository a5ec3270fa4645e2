# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""RULE19 judgement, through the product's code on cached flip-TTA reconstructions of the shipped ensemble.
python j19.py DEV.npz [--dry]   (--dry: a spent set, to check the harness)"""
import sys, json, time
import numpy as np, torch
sys.path.insert(0, "/work/main")
from sklearn.metrics import roc_auc_score
from model.atlas import with_atlas
from model.checkpoint import Detector, read_checkpoint, default_weights_path
from model.scoring import AtlasFitter, ScoringConfig, residual_map, slice_heights
from model.train import SliceSet, calibrate_from_raw
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
t0 = time.time()
ck, sha = read_checkpoint(default_weights_path()); assert sha.startswith("a6de8ec2"), sha
shipped = Detector(ck, device="cpu")
def load(path, reckey="rec", normals_only=False):
    z = np.load(path); shape = tuple(z["shape"]); n = int(np.prod(shape))
    brain = np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape)
    meta = json.loads(str(z["meta"])); ser = z["series"]; idx = np.arange(len(ser))
    if normals_only:
        normal = np.array([m["label"] == "normal" for m in meta]); idx = np.where(normal[ser])[0]
    return dict(x=z["x"][idx], rec=z[reckey][idx], brain=brain[idx], series=ser[idx], sl=z["slice_lesion"][idx], meta=meta)
def heats(d):
    for j in range(0, len(d["x"]), 256):
        x1 = torch.from_numpy(d["x"][j:j+256].astype(np.float32))[:, None]; r1 = torch.from_numpy(d["rec"][j:j+256].astype(np.float32))[:, None]
        yield j, x1, r1, torch.from_numpy(d["brain"][j:j+256])
# 1. the atlas: the product's AtlasFitter on the normals of dev7, dev8, dev9 (RULE19)
sc = ScoringConfig.from_dict(ck["scoring"])
fitter = AtlasFitter(16, 128)
for path in ["/work/runs/s12/dev7_bundled.npz", "/work/runs/s13/dev8_bundled.npz", "/work/runs/s14/dev9_bundled.npz"]:
    d = load(path, normals_only=True); h = slice_heights(d["series"]); tag = path.split("/")[-1][:4]
    for j, x1, r1, m in heats(d):
        fitter.add(residual_map(x1, r1, m, sc), m, h[j:j+256], np.array([f"{tag}-{s}" for s in d["series"][j:j+256]]))
atlas = fitter.finish(sigma=1.5, eps=0.002)
print(f"atlas: {atlas.n_series} normal series, {atlas.n_slices} slices ({time.time()-t0:.0f}s)", flush=True)
assert atlas.n_series == 440
cand = with_atlas(ck, atlas, sigma=1.5, source="normals of dev7, dev8, dev9 (cached reconstructions)")
cdet = Detector(cand, device="cpu")
def raw(det, d):
    h = slice_heights(d["series"]); r = np.zeros(len(d["x"])); H = []
    with torch.inference_mode():
        for j, x1, r1, m in heats(d):
            s, heat = det.rec_stat(x1, r1, m, h[j:j+256]); r[j:j+256] = s.numpy(); H.append(heat.numpy())
    return r, np.concatenate(H)
# 2. calibration of the candidate on the 152 normals (val 32 + dev6 120), as calibrate_from_raw does
val = load("/work/runs/s12/val_bundled.npz"); d6 = load("/work/runs/s11/dev6.npz", "rec_new", normals_only=True)
cal = {k: np.concatenate([val[k], d6[k]]) for k in ["x", "rec", "brain"]}
cal["series"] = np.concatenate([val["series"], d6["series"] + 10_000])
r_cal, heat_cal = raw(cdet, cal)
cset = SliceSet(cal["x"].astype(np.float32), cal["brain"], cal["series"])
assert cset.n_series == 152
cand = calibrate_from_raw(cand, cset, np.zeros(len(r_cal)), r_cal, heat_cal)
cdet = Detector(cand, device="cpu")
print(f"candidate calibrated on {cset.n_series} series: thr {cdet.threshold:.3f}, norm r {cand['norm']['r_mean']:.4f}/{cand['norm']['r_std']:.4f} "
      f"(shipped thr {shipped.threshold:.3f}) ({time.time()-t0:.0f}s)", flush=True)
# 3. the judging set
d = load(sys.argv[1]); meta = d["meta"]
y = np.array([m["label"] != "normal" for m in meta]); sub = np.array([m["subtle"] for m in meta]); fam = np.array([m["label"] for m in meta])
res = {}
for tag, det in [("shipped", shipped), ("ATLAS", cdet)]:
    r, _ = raw(det, d)
    z, _, _ = det.normalise(np.zeros(len(r)), r, 0.5)
    ss = np.array([z[d["series"] == i].max() for i in np.unique(d["series"])])
    t95 = np.quantile(ss[~y], 0.95)
    subA = roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((y & sub).sum())], np.r_[ss[~y], ss[y & sub]])
    nsA = roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((y & ~sub).sum())], np.r_[ss[~y], ss[y & ~sub]])
    res[tag] = dict(series=roc_auc_score(y, ss), slice=roc_auc_score(d["sl"], z), spec=float((ss[~y] < det.threshold).mean()),
                    sens=float((ss[y] >= det.threshold).mean()), sens95=float((ss[y] > t95).mean()), subtle=subA, nonsubtle=nsA,
                    thr=det.threshold, ss=ss)
    fams = {f: roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((fam == f).sum())], np.r_[ss[~y], ss[fam == f]]) for f in sorted(set(fam) - {"normal"})}
    v = res[tag]
    print(f"{tag:8s} series {v['series']:.3f} slice {v['slice']:.3f} subtle {subA:.3f} non-subtle {nsA:.3f} | thr {v['thr']:.3f}: spec {v['spec']:.3f} "
          f"sens {v['sens']:.3f} | sens at own 95 % spec {v['sens95']:.3f}", flush=True)
    print("   per family: " + ", ".join(f"{f} {a:.2f}" for f, a in fams.items()), flush=True)
a, b = res["ATLAS"], res["shipped"]
diff = {k: a[k] - b[k] for k in ["series", "slice", "spec", "sens95", "sens"]}
ok = [diff["series"] >= 0.0, diff["slice"] >= 0.003, diff["spec"] >= -0.03, diff["sens95"] >= -0.01]
print(f"ATLAS - shipped: series {diff['series']:+.3f} (>= +0.000 {'PASS' if ok[0] else 'FAIL'}), slice {diff['slice']:+.3f} (>= +0.003 {'PASS' if ok[1] else 'FAIL'}), "
      f"spec@thr {diff['spec']:+.3f} (>= -0.03 {'PASS' if ok[2] else 'FAIL'}), sens@own95 {diff['sens95']:+.3f} (>= -0.01 {'PASS' if ok[3] else 'FAIL'}); "
      f"reported: sens@thr {diff['sens']:+.3f}")
rng = np.random.default_rng(0); bs = []
for _ in range(2000):
    i = rng.integers(0, len(y), len(y))
    if y[i].all() or (~y[i]).all(): continue
    bs.append(roc_auc_score(y[i], a["ss"][i]) - roc_auc_score(y[i], b["ss"][i]))
print(f"paired bootstrap of the series difference: {np.mean(bs):+.3f}, 95 % [{np.quantile(bs, 0.025):+.3f}, {np.quantile(bs, 0.975):+.3f}]")
print(("VERDICT: ADOPT" if all(ok) else "VERDICT: not adopted") + ("  (DRY RUN on a spent set: decides nothing)" if "--dry" in sys.argv else ""))
json.dump({k: {kk: vv for kk, vv in v.items() if kk != "ss"} for k, v in res.items()} | {"pass": ok}, open(sys.argv[1].split("/")[-1].replace(".npz", "_j19.json"), "w"), indent=1)

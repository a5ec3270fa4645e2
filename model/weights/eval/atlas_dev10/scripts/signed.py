# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s15 exploration on SPENT sets: signed residual, bone/CSF-proximity exclusion (bundled caches)."""
import sys, json, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, smooth, masked_stat
from sklearn.metrics import roc_auc_score
torch.set_num_threads(1)
cfg = ScoringConfig(smooth_sigma=1.5, rec_q=0.001, flip_tta=True)
SETS = {"val": "/work/runs/s12/val_bundled.npz", "dev7": "/work/runs/s12/dev7_bundled.npz", "dev8": "/work/runs/s13/dev8_bundled.npz"}
def dil(m, r):
    return F.max_pool2d(m[:, None].float(), 2 * r + 1, 1, r)[:, 0] > 0
def stats(path):
    z = np.load(path); shape = tuple(z["shape"]); n = int(np.prod(shape))
    brain = np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape)
    out = {}
    for j in range(0, shape[0], 256):
        x = torch.from_numpy(z["x"][j:j+256].astype(np.float32)); rec = torch.from_numpy(z["rec"][j:j+256].astype(np.float32))
        m = torch.from_numpy(brain[j:j+256]); mf = m.float()
        d = smooth((x - rec) * mf, 1.5) * mf
        a = smooth((x - rec).abs() * mf, 1.5) * mf
        bone = x >= 0.99; csf = x <= 0.15
        v = {"abs": (a, m), "pos": (d.clamp(min=0), m), "neg": ((-d).clamp(min=0), m)}
        for r in (2, 4):
            mm = m & ~dil(bone, r); v[f"nobone{r}"] = (a * mm, mm)
        mm = m & ~dil(csf, 1); v["nocsf1"] = (a * mm, mm)
        mm = m & ~dil(bone, 2) & ~dil(csf, 1); v["nobone2csf1"] = (a * mm, mm)
        for k, (mp, mk) in v.items():
            out.setdefault(k, []).append(masked_stat(mp, mk, cfg))
    return {k: torch.cat(v).numpy().astype(np.float64) for k, v in out.items()}, z["series"], z["slice_lesion"], json.loads(str(z["meta"]))
def smax(series, s): return np.array([s[series == i].max() for i in np.unique(series)])
V, vser, _, _ = stats(SETS["val"])
np.savez("sg_val.npz", series=vser, **V)
for ds in ["dev8", "dev7"]:
    D, ser, sl, meta = stats(SETS[ds]); np.savez(f"sg_{ds}.npz", series=ser, slice_lesion=sl, meta=np.array(json.dumps(meta)), **D)
    y = np.array([m["label"] != "normal" for m in meta]); sub = np.array([m["subtle"] for m in meta])
    zs = {}
    for k in D:
        mu, sd = V[k].mean(), V[k].std(); zs[k] = (D[k] - mu) / sd
    zs["max_pos_neg"] = np.maximum(zs["pos"], zs["neg"])
    for k, zz in zs.items():
        ss = smax(ser, zz); t95 = np.quantile(ss[~y], 0.95)
        subA = roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((y & sub).sum())], np.r_[ss[~y], ss[y & sub]])
        print(f"{ds} {k:12s} series {roc_auc_score(y, ss):.3f} slice {roc_auc_score(sl, zz):.3f} subtle {subA:.3f} sens@95 {(ss[y] > t95).mean():.3f}", flush=True)

# ruff: noqa -- research script of the twelfth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s12: slice-context variants on dev6 for both ensembles (rec = pre-s11 ensemble, rec_new = bundled).
python explore2.py"""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import ScoringConfig, residual_map, masked_stat
from sklearn.metrics import roc_auc_score
torch.set_num_threads(1)

def load(name, key):
    z = np.load(f"/work/runs/s11/{name}.npz")
    shape = tuple(z["shape"]); n = int(np.prod(shape))
    return dict(x=z["x"], rec=z[key], brain=np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape),
                series=z["series"], slice_lesion=z["slice_lesion"], meta=json.loads(str(z["meta"])))

def stat(d, cfg, bs=256):
    out = []
    for j in range(0, len(d["x"]), bs):
        x = torch.from_numpy(d["x"][j:j+bs].astype(np.float32)); r = torch.from_numpy(d["rec"][j:j+bs].astype(np.float32)); m = torch.from_numpy(d["brain"][j:j+bs])
        out.append(masked_stat(residual_map(x, r, m, cfg), m, cfg))
    return torch.cat(out).numpy().astype(np.float64)

def nbr(series, s, w, reach=1):
    o = s.copy()
    for i in np.unique(series):
        idx = np.where(series == i)[0]; v = s[idx]; acc = v.copy(); tot = 1.0
        for k in range(1, reach + 1):
            p = np.r_[v[:1].repeat(k), v[:-k]] if len(v) > k else np.full_like(v, v[0])
            n = np.r_[v[k:], v[-1:].repeat(k)] if len(v) > k else np.full_like(v, v[-1])
            acc = acc + (w ** k) * (p + n); tot += 2 * w ** k
        o[idx] = acc / tot
    return o

def agg(series, s, how):
    return np.array([np.sort(s[series == i])[::-1][:how].mean() for i in np.unique(series)])

for key in ("rec", "rec_new"):
    v, d = load("val", key), load("dev6", key)
    y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
    for q in (0.003, 0.001):
        cfg = ScoringConfig(smooth_sigma=1.5, rec_q=q, flip_tta=True)
        rv, r = stat(v, cfg), stat(d, cfg)
        for w, reach in ((0, 1), (0.25, 1), (0.5, 1), (1.0, 1), (0.5, 2)):
            zv0 = nbr(v["series"], rv, w, reach); z0 = nbr(d["series"], r, w, reach)
            mu, sd = zv0.mean(), zv0.std(); zv, z = (zv0 - mu) / sd, (z0 - mu) / sd
            out = f"{key:7s} q {q} w {w} r {reach}: slice {roc_auc_score(d['slice_lesion'], z):.3f}"
            for how in (1, 2, 3):
                ss = agg(d["series"], z, how); thr = np.quantile(agg(v["series"], zv, how), 0.95)
                out += f" | top{how} series {roc_auc_score(y, ss):.3f} subtle {roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones(sub.sum())], np.r_[ss[~y], ss[sub]]):.3f} spec {(ss[~y] < thr).mean():.3f} sens {(ss[y] >= thr).mean():.3f}"
            print(out, flush=True)

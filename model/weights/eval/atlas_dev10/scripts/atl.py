# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
import sys, json, numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import smooth
from sklearn.metrics import roc_auc_score
torch.set_num_threads(2)
def L(name, normals_only=False):
    z = np.load(f"/work/runs/s15/maps_{name}.npz"); a = z["a"]; n = a.size
    d = dict(a=torch.from_numpy(a), m=torch.from_numpy(np.unpackbits(z["brain"], count=n).astype(bool).reshape(a.shape)),
             h=z["h"], series=z["series"], sl=z["slice_lesion"], meta=json.loads(str(z["meta"])))
    if normals_only:
        normal = np.array([m["label"] == "normal" for m in d["meta"]]); w = np.where(normal[d["series"]])[0]
        d = dict(a=d["a"][w], m=d["m"][w], h=d["h"][w], series=d["series"][w], sl=d["sl"][w], meta=d["meta"])
    return d
def topq(v, m, q=0.001):
    b = v.shape[0]; flat = v.reshape(b, -1).float(); mask = m.reshape(b, -1)
    n = mask.sum(1).clamp(min=1); kb = (q * n.float()).round().clamp(min=1).long(); kmax = int(kb.max())
    vals = torch.where(mask, flat, torch.full_like(flat, -1e9)); top = vals.topk(kmax, dim=1).values.cumsum(1)
    return (top.gather(1, (kb - 1)[:, None])[:, 0] / kb.float()).numpy().astype(np.float64)
def build(AT, NB, sig):
    S1 = torch.zeros(NB, 128, 128); S2 = torch.zeros(NB, 128, 128); C = torch.zeros(NB, 128, 128)
    for d in AT:
        b = np.minimum((d["h"] * NB).astype(int), NB - 1)
        for k in range(NB):
            w = torch.from_numpy(b == k); a = d["a"][w].float(); m = d["m"][w].float()
            S1[k] += a.sum(0); S2[k] += (a * a).sum(0); C[k] += m.sum(0)
    sC = smooth(C, sig); mu = smooth(S1, sig) / sC.clamp(min=1e-3); var = smooth(S2, sig) / sC.clamp(min=1e-3) - mu ** 2
    gmu = S1.sum() / C.sum(); gsd = (S2.sum() / C.sum() - gmu ** 2).sqrt()
    ok = sC > 20
    return torch.where(ok, mu, gmu), torch.where(ok, var.clamp(min=1e-8).sqrt(), gsd)
def score(d, NB, mu, sd, eps):
    if NB == 0:
        return np.concatenate([topq(d["a"][j:j+1024].float(), d["m"][j:j+1024]) for j in range(0, len(d["h"]), 1024)])
    b = torch.from_numpy(np.minimum((d["h"] * NB).astype(int), NB - 1)); out = []
    for j in range(0, len(b), 1024):
        a = d["a"][j:j+1024].float(); bb = b[j:j+1024]
        out.append(topq((a - mu[bb]) / (sd[bb] + eps), d["m"][j:j+1024]))
    return np.concatenate(out)
def smax(series, s): return np.array([s[series == i].max() for i in np.unique(series)])

# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s15 exploration (SPENT sets): normative residual atlas variants. Atlas from dev6+dev7 normals; val normalises; dev8, dev9 scored."""
import sys, json, numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import smooth
from sklearn.metrics import roc_auc_score
torch.set_num_threads(2)
def L(name):
    z = np.load(f"maps_{name}.npz"); a = z["a"]; n = a.size
    return dict(a=torch.from_numpy(a), m=torch.from_numpy(np.unpackbits(z["brain"], count=n).astype(bool).reshape(a.shape)),
                h=z["h"], series=z["series"], sl=z["slice_lesion"], meta=json.loads(str(z["meta"])))
AT = [L("a6"), L("a7")]; V = L("val"); D = {k: L(k) for k in ["dev8", "dev9"]}
def topq(v, m, q=0.001):
    b = v.shape[0]; flat = v.reshape(b, -1).float(); mask = m.reshape(b, -1)
    n = mask.sum(1).clamp(min=1); kb = (q * n.float()).round().clamp(min=1).long(); kmax = int(kb.max())
    vals = torch.where(mask, flat, torch.full_like(flat, -1e9)); top = vals.topk(kmax, dim=1).values.cumsum(1)
    return (top.gather(1, (kb - 1)[:, None])[:, 0] / kb.float()).numpy().astype(np.float64)
def build(NB, sig):
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
def score(d, NB, mu, sd, eps, kind):
    b = torch.from_numpy(np.minimum((d["h"] * NB).astype(int), NB - 1)); out = []
    for j in range(0, len(b), 1024):
        a = d["a"][j:j+1024].float(); bb = b[j:j+1024]
        v = (a - mu[bb]) / (sd[bb] + eps) if kind == "z" else a / (mu[bb] + eps)
        out.append(topq(v, d["m"][j:j+1024]))
    return np.concatenate(out)
def smax(series, s): return np.array([s[series == i].max() for i in np.unique(series)])
def report(tag, vs, ds):
    mu_, sd_ = vs.mean(), vs.std(); line = []
    for k, d in D.items():
        zz = (ds[k] - mu_) / sd_; ss = smax(d["series"], zz)
        y = np.array([m["label"] != "normal" for m in d["meta"]]); sub = np.array([m["subtle"] for m in d["meta"]])
        t95 = np.quantile(ss[~y], 0.95)
        subA = roc_auc_score(np.r_[np.zeros((~y).sum()), np.ones((y & sub).sum())], np.r_[ss[~y], ss[y & sub]])
        line.append(f"{k}: ser {roc_auc_score(y, ss):.3f} sl {roc_auc_score(d['sl'], zz):.3f} sub {subA:.3f} s95 {(ss[y] > t95).mean():.3f}")
    print(f"{tag:28s} " + " | ".join(line), flush=True)
ones = torch.zeros(1, 128, 128)
report("abs (shipped)", score(V, 1, ones, ones + 1, 1.0, "r") , {k: score(d, 1, ones, ones + 1, 1.0, "r") for k, d in D.items()})
for NB in [4, 8, 16]:
    for sig in [1.5, 3.0, 6.0]:
        mu, sd = build(NB, sig)
        for kind, eps in [("z", 0.002), ("z", 0.005), ("z", 0.01), ("r", 0.005)]:
            report(f"NB{NB} sig{sig} {kind} eps{eps}", score(V, NB, mu, sd, eps, kind), {k: score(d, NB, mu, sd, eps, kind) for k, d in D.items()})

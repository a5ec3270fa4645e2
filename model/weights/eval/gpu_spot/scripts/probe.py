# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s13: spot-repair probe (as the tenth session's diag2): paint one Gaussian spot into 200 validation
slices at a random brain pixel; repair = 1 - <rec(x+s) - rec(x), s> / <s, s>, per member, no TTA."""
import sys, json
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.checkpoint import read_checkpoint, default_weights_path
from model.network import NetConfig, build_network
torch.set_num_threads(1)
z = np.load("/work/runs/s12/val_bundled.npz"); shape = tuple(z["shape"])
brain = np.unpackbits(z["brain"], count=int(np.prod(shape))).astype(bool).reshape(shape)
rng = np.random.default_rng(0)
ok = np.where(brain.reshape(len(brain), -1).sum(1) > 2000)[0]
idx = rng.choice(ok, 200, replace=False)
x = torch.from_numpy(z["x"][idx].astype(np.float32))
yy, xx = np.mgrid[:128, :128]
centres = [np.argwhere(brain[i])[rng.integers(0, brain[i].sum())] for i in idx]
ck, _ = read_checkpoint(default_weights_path()); ens = build_network(NetConfig.from_dict(ck["net_config"])); ens.load_state_dict(ck["state_dict"])
def member(tag, k):
    if tag == "bundled": return ens.members[k].eval()
    st = torch.load(f"/work/runs/s13/gpu/{'B' if tag == 'B' else 'B2'}{k}.pt", weights_only=False)
    n = build_network(NetConfig.from_dict(st["cfg"])); n.load_state_dict(st["state_dict"]); return n.eval()
for tag in ["bundled", "B", "B2"]:
    row = []
    for sg, hu in [(0.8, 15), (1.2, 15), (1.5, 12), (2.0, 12)]:
        s = torch.from_numpy(np.stack([np.exp(-((yy - c[0])**2 + (xx - c[1])**2) / (2 * sg * sg)) for c in centres]).astype(np.float32)) * hu / 80
        reps = []
        for k in range(4):
            n = member(tag, k)
            with torch.inference_mode():
                r0 = n(x[:, None], sample=False).recon[:, 0]; r1 = n((x + s)[:, None], sample=False).recon[:, 0]
            reps.append(1 - float(((r1 - r0) * s).sum() / (s * s).sum()))
        row.append(f"sigma {sg} +{hu}HU {100*np.mean(reps):.0f}% (members {' '.join(f'{100*r:.0f}' for r in reps)})")
    print(tag, " | ".join(row), flush=True)

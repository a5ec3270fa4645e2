# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s13: flip-TTA mean reconstruction of a candidate ensemble (members from gpu/).
python recon8c.py NAME TAG FILE...   NAME = val (32 validation series, from the cache) or dev8 (images
read from dev8_bundled.npz, no regeneration) -> /work/runs/s13/NAME_TAG.npz"""
import sys, time, json, os
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.network import NetConfig, build_network

name, tag, files = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
nets = []
for f in files:
    st = torch.load(f, weights_only=False)
    n = build_network(NetConfig.from_dict(st["cfg"])); n.load_state_dict(st["state_dict"]); n.eval(); nets.append(n)
    print(f, st["steps"], st.get("init"), st.get("seed"), flush=True)
assert len(nets) == 4

def tta(net, xb):
    return 0.5 * (net(xb, sample=False, decode=True).recon + net(xb.flip(-1), sample=False, decode=True).recon.flip(-1))[:, 0]

src = {"val": "/work/runs/s12/val_bundled.npz", "dev7": "/work/runs/s12/dev7_bundled.npz"}.get(name, f"/work/runs/s13/{name}_bundled.npz")
z = dict(np.load(src))
x = z["x"]; R = []
t0 = time.time()
with torch.inference_mode():
    for j in range(0, len(x), 32):
        xb = torch.from_numpy(x[j:j + 32].astype(np.float32))[:, None]
        R.append((sum(tta(n, xb) for n in nets) / len(nets)).numpy().astype(np.float16))
        if j % 1600 == 0:
            print(f"{name}/{tag}: {j}/{len(x)} slices {time.time()-t0:.0f}s", flush=True)
z["rec"] = np.concatenate(R)
np.savez(f"/work/runs/s13/{name}_{tag}.npz", **z)
print("done", name, tag, time.time() - t0, flush=True)

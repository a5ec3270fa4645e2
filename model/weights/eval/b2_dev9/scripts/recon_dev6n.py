# ruff: noqa -- research script of the fourteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s14 (after RULE18, exploration): B2's flip-TTA reconstruction of dev6's 120 normal series (the product's
calibration normals besides the 32 validation series). python recon_dev6n.py K P -> dev6n_B2.partK.npz"""
import sys, json, os, time
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.network import NetConfig, build_network
k, p = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
nets = []
for m in range(4):
    st = torch.load(f"/work/runs/s13/gpu/B2{m}.pt", weights_only=False)
    n = build_network(NetConfig.from_dict(st["cfg"])); n.load_state_dict(st["state_dict"]); n.eval(); nets.append(n)
def tta(net, xb):
    return 0.5 * (net(xb, sample=False, decode=True).recon + net(xb.flip(-1), sample=False, decode=True).recon.flip(-1))[:, 0]
z = np.load("/work/runs/s11/dev6.npz"); meta = json.loads(str(z["meta"]))
normal = [i for i, m in enumerate(meta) if m["label"] == "normal"]; assert len(normal) == 120
mine = normal[k::p]
idx = np.where(np.isin(z["series"], mine))[0]
x = z["x"][idx]; R = []; t0 = time.time()
with torch.inference_mode():
    for j in range(0, len(x), 32):
        xb = torch.from_numpy(x[j:j + 32].astype(np.float32))[:, None]
        R.append((sum(tta(n, xb) for n in nets) / 4).numpy().astype(np.float16))
        if j % 640 == 0: print(j, len(x), f"{time.time()-t0:.0f}s", flush=True)
np.savez(f"/work/runs/s14/dev6n_B2.part{k}.npz", idx=idx, rec=np.concatenate(R))
print("done", time.time() - t0, flush=True)

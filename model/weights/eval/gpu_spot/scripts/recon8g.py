# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s13: one pass over a synthetic set with ONE ensemble (flip-TTA mean reconstruction).
python recon7.py NAME NORMALS ABNORMALS SEED TAG [--val]   TAG = bundled | C  -> /work/runs/s12/NAME_TAG.npz"""
import sys, time, json, os
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "/work/main")
from triage_agent.inference import synthetic_case
from model.synth import make_dataset_plan
from model.checkpoint import load_detector
from model.network import NetConfig, build_network

name, nn, na, seed, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
plan = make_dataset_plan(nn, na, seed)
if "--val" in sys.argv:
    ids = np.arange(len(plan)); rng = np.random.default_rng(seed); rng.shuffle(ids)
    plan = [plan[i] for i in sorted(ids[:32])]
cache = Path("/work/runs/cache")
if tag == "bundled":
    det = load_detector(None, device="cpu"); assert det.scoring.flip_tta
    nets = [det.net]
else:
    nets = []
    for k in range(4):
        st = torch.load(f"/work/runs/s13/gpu/{tag}{k}.pt", weights_only=False)
        n = build_network(NetConfig.from_dict(st["cfg"])); n.load_state_dict(st["state_dict"]); n.eval(); nets.append(n)

def tta(net, xb):
    return 0.5 * (net(xb, sample=False, decode=True).recon + net(xb.flip(-1), sample=False, decode=True).recon.flip(-1))[:, 0]

X, R, B, L, sl_series, sl_les, ser = [], [], [], [], [], [], []
t0 = time.time()
for i, (s, lab) in enumerate(plan):
    c = synthetic_case(s, lab, cache_dir=cache)
    x = torch.from_numpy(c.x.astype(np.float32))[:, None]
    with torch.inference_mode():
        r = [sum(tta(n, x[j:j + 32]) for n in nets) / len(nets) for j in range(0, len(x), 32)]
    X.append(c.x.astype(np.float16)); R.append(torch.cat(r).numpy().astype(np.float16)); B.append(c.brain)
    les = c.lesion if c.lesion is not None else np.zeros_like(c.brain)
    L.append(les); sl_series += [i] * len(c.x); sl_les += list(les.reshape(len(les), -1).any(1))
    ser.append(dict(case=c.case_id, label=c.label, subtle=bool(c.subtle), seed=int(s), n=len(c.x)))
    if i % 10 == 0:
        print(f"{name}/{tag}: {i+1}/{len(plan)} series, {sum(len(a) for a in X)} slices, {time.time()-t0:.0f}s", flush=True)
np.savez(f"/work/runs/s13/{name}_{tag}.npz", x=np.concatenate(X), rec=np.concatenate(R),
         brain=np.packbits(np.concatenate(B)), lesion=np.packbits(np.concatenate(L)),
         shape=np.array(np.concatenate(X).shape), series=np.array(sl_series),
         slice_lesion=np.array(sl_les), meta=np.array(json.dumps(ser)))
print("done", name, tag, time.time() - t0, flush=True)

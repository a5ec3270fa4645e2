# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s14: one pass over a fresh synthetic set with ONE ensemble (flip-TTA mean reconstruction).
python recon9.py NAME NORMALS ABNORMALS SEED TAG [--reverse]   TAG = bundled | B2 (members /work/runs/s13/gpu/B20-B23.pt)
--reverse walks the plan backwards (two jobs side by side then generate each case once, via the cache);
the output is in plan order either way -> /work/runs/s14/NAME_TAG.npz"""
import sys, time, json, os
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "/work/main")
from triage_agent.inference import synthetic_case
from model.synth import make_dataset_plan
from model.checkpoint import load_detector
from model.network import NetConfig, build_network

name, nn, na, seed, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
plan = make_dataset_plan(nn, na, seed)
cache = Path("/work/runs/cache")
if tag == "bundled":
    det = load_detector(None, device="cpu"); assert det.scoring.flip_tta
    nets = [det.net]
else:
    nets = []
    for k in range(4):
        st = torch.load(f"/work/runs/s13/gpu/B2{k}.pt", weights_only=False)
        n = build_network(NetConfig.from_dict(st["cfg"])); n.load_state_dict(st["state_dict"]); n.eval(); nets.append(n)

def tta(net, xb):
    return 0.5 * (net(xb, sample=False, decode=True).recon + net(xb.flip(-1), sample=False, decode=True).recon.flip(-1))[:, 0]

order = list(range(len(plan)))[::-1] if "--reverse" in sys.argv else list(range(len(plan)))
part = ""
if "--part" in sys.argv:  # --part K/P: only the plan indices i with i % P == K (a restart split over both cores)
    k_, p_ = map(int, sys.argv[sys.argv.index("--part") + 1].split("/"))
    order = [i for i in order if i % p_ == k_]; part = f".part{k_}"
out = {}
t0 = time.time()
for k, i in enumerate(order):
    s, lab = plan[i]
    c = synthetic_case(s, lab, cache_dir=cache)
    x = torch.from_numpy(c.x.astype(np.float32))[:, None]
    with torch.inference_mode():
        r = [sum(tta(n, x[j:j + 32]) for n in nets) / len(nets) for j in range(0, len(x), 32)]
    les = c.lesion if c.lesion is not None else np.zeros_like(c.brain)
    out[i] = (c.x.astype(np.float16), torch.cat(r).numpy().astype(np.float16), c.brain, les,
              dict(case=c.case_id, label=c.label, subtle=bool(c.subtle), seed=int(s), n=len(c.x)))
    if k % 10 == 0:
        print(f"{name}/{tag}: {k+1}/{len(plan)} series, {time.time()-t0:.0f}s", flush=True)
X, R, B, L, sl_series, sl_les, ser = [], [], [], [], [], [], []
for i in sorted(out):
    x, r, b, les, m = out[i]; m["plan_index"] = i
    X.append(x); R.append(r); B.append(b); L.append(les); ser.append(m)
    sl_series += [len(ser) - 1] * len(x); sl_les += list(les.reshape(len(les), -1).any(1))
np.savez(f"/work/runs/s15/{name}_{tag}{part}.npz", x=np.concatenate(X), rec=np.concatenate(R),
         brain=np.packbits(np.concatenate(B)), lesion=np.packbits(np.concatenate(L)),
         shape=np.array(np.concatenate(X).shape), series=np.array(sl_series),
         slice_lesion=np.array(sl_les), meta=np.array(json.dumps(ser)))
print("done", name, tag, time.time() - t0, flush=True)

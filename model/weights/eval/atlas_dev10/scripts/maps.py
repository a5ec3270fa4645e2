# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s15: cache smoothed abs residual maps (sigma 1.5, float16), brain masks, relative height, of a recon cache.
python maps.py NAME PATH RECKEY [normals_only]"""
import sys, json, numpy as np, torch
sys.path.insert(0, "/work/main")
from model.scoring import smooth
torch.set_num_threads(2)
name, path, rk = sys.argv[1:4]; only_normal = len(sys.argv) > 4
z = np.load(path); shape = tuple(z["shape"]); n = int(np.prod(shape))
brain = np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape)
ser = z["series"]; h = np.zeros(len(ser)); meta = json.loads(str(z["meta"]))
for i in np.unique(ser):
    w = np.where(ser == i)[0]; h[w] = (np.arange(len(w)) + 0.5) / len(w)
idx = np.arange(len(ser))
if only_normal:
    normal = np.array([m["label"] == "normal" for m in meta]); idx = np.where(normal[ser])[0]
A = np.zeros((len(idx), 128, 128), np.float16)
for j in range(0, len(idx), 256):
    ii = idx[j:j+256]
    x = torch.from_numpy(z["x"][ii].astype(np.float32)); rec = torch.from_numpy(z[rk][ii].astype(np.float32))
    mf = torch.from_numpy(brain[ii]).float()
    A[j:j+256] = (smooth((x - rec).abs() * mf, 1.5) * mf).numpy().astype(np.float16)
np.savez(f"maps_{name}.npz", a=A, brain=np.packbits(brain[idx]), h=h[idx], series=ser[idx],
         slice_lesion=z["slice_lesion"][idx], meta=z["meta"])
print("done", name, A.shape)

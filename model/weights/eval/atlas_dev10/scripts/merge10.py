# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""s14: merge recon9.py --part outputs (plan_index in meta) into one NAME_TAG.npz in plan order.
python merge9.py NAME TAG NPARTS"""
import sys, json
import numpy as np
name, tag, parts = sys.argv[1], sys.argv[2], int(sys.argv[3])
per = {}
for k in range(parts):
    z = np.load(f"/work/runs/s15/{name}_{tag}.part{k}.npz"); shape = tuple(z["shape"]); n = int(np.prod(shape))
    brain = np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape)
    les = np.unpackbits(z["lesion"], count=n).astype(bool).reshape(shape)
    meta = json.loads(str(z["meta"]))
    for j, m in enumerate(meta):
        w = z["series"] == j
        per[m["plan_index"]] = (z["x"][w], z["rec"][w], brain[w], les[w], z["slice_lesion"][w], m)
assert sorted(per) == list(range(len(per))), "missing plan indices"
X, R, B, L, SL, ser, sl_series = [], [], [], [], [], [], []
for i in range(len(per)):
    x, r, b, l, sl, m = per[i]
    X.append(x); R.append(r); B.append(b); L.append(l); SL.append(sl); ser.append(m); sl_series += [i] * len(x)
np.savez(f"/work/runs/s15/{name}_{tag}.npz", x=np.concatenate(X), rec=np.concatenate(R),
         brain=np.packbits(np.concatenate(B)), lesion=np.packbits(np.concatenate(L)),
         shape=np.array(np.concatenate(X).shape), series=np.array(sl_series),
         slice_lesion=np.concatenate(SL), meta=np.array(json.dumps(ser)))
print("merged", name, tag, len(per), "series", sum(len(a) for a in X), "slices")

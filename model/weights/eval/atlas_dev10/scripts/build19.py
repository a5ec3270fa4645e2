# ruff: noqa -- research script of the fifteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""Build the bundled checkpoint after RULE19: the shipped file + the residual atlas (16 bins, sigma 1.5, eps 0.002) fitted
by the product's AtlasFitter on the normals of dev7, dev8, dev9 (cached flip-TTA reconstructions of these same weights),
then calibrated by the product's calibrate (network run afresh) on the 152 normals of the shipped file's calibration.
python build19.py OUT.pt"""
import sys, copy, json, os, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.atlas import with_atlas
from model.checkpoint import read_checkpoint, default_weights_path, save_checkpoint
from model.scoring import AtlasFitter, ScoringConfig, residual_map, slice_heights
from model.synth import make_dataset_plan
from model.train import calibrate, SliceSet
from triage_agent.commands.train import cases_to_slices
from triage_agent.inference import synthetic_cases, synthetic_case
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
out = Path(sys.argv[1]); cache = Path("/work/runs/cache"); t0 = time.time()
ck, sha = read_checkpoint(default_weights_path()); assert sha.startswith("a6de8ec2"), sha
sc = ScoringConfig.from_dict(ck["scoring"])
fitter = AtlasFitter(16, 128)
for path in ["/work/runs/s12/dev7_bundled.npz", "/work/runs/s13/dev8_bundled.npz", "/work/runs/s14/dev9_bundled.npz"]:
    z = np.load(path); shape = tuple(z["shape"]); n = int(np.prod(shape))
    brain = np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape)
    meta = json.loads(str(z["meta"])); ser = z["series"]
    normal = np.array([m["label"] == "normal" for m in meta]); idx = np.where(normal[ser])[0]
    h = slice_heights(ser[idx]); tag = path.split("/")[-1][:4]
    for j in range(0, len(idx), 256):
        ii = idx[j:j+256]
        x1 = torch.from_numpy(z["x"][ii].astype(np.float32))[:, None]; r1 = torch.from_numpy(z["rec"][ii].astype(np.float32))[:, None]
        m = torch.from_numpy(brain[ii])
        fitter.add(residual_map(x1, r1, m, sc), m, h[j:j+256], np.array([f"{tag}-{s}" for s in ser[ii]]))
atlas = fitter.finish(sigma=1.5, eps=0.002); assert atlas.n_series == 440
print(f"atlas: {atlas.n_series} series, {atlas.n_slices} slices ({time.time()-t0:.0f}s)", flush=True)
new = with_atlas(ck, atlas, sigma=1.5, source=(
    "the 440 normal series of make_dataset_plan(120, 132, 10000) (dev7), (120, 132, 11000) (dev8) and (200, 180, 12000) (dev9), "
    "from cached flip-TTA reconstructions of these weights; fifteenth session, RULE19"))
new["training"] = copy.deepcopy(new["training"]); new["training"]["built_from"] = {"sha256": sha, "name": ck["name"]}
new["name"] = ck["name"] + "-atlas"
_, va = cases_to_slices(synthetic_cases(160, 0, 1000, cache_dir=cache)).split(0.2, 1000)
assert va.n_series == 32 and len(va) == 1119, (va.n_series, len(va))
dev6n = [synthetic_case(s, lab, cache_dir=cache) for s, lab in make_dataset_plan(120, 132, 9000) if lab == "normal"]
assert len(dev6n) == 120
cal = SliceSet.concat([va, cases_to_slices(dev6n)])
new = calibrate(new, cal)
new["training"]["val_series"], new["training"]["val_slices"] = va.n_series, len(va)
digest = save_checkpoint(new, out)
print(f"wrote {out} in {time.time()-t0:.0f}s: calibrated on {cal.n_series} series / {len(cal)} slices; thr(max) "
      f"{new['thresholds']['max']:.4f} topk {new['thresholds']['topk_mean']:.4f} pixel {new['pixel_threshold']:.4f} "
      f"norm r {new['norm']['r_mean']:.5f}/{new['norm']['r_std']:.5f} size {out.stat().st_size/1e6:.1f} MB sha {digest[:12]}")

"""How the detector does at synthetic sites it was not trained on, zero-shot and onboarded.

    python -m triage_agent.site_eval --site A --site B --onboard 20 --test-normals 10 \\
        --test-abnormals 11 --cache DIR --out results.json

For each site (``triage_model.sites``): normal series to onboard from and separate test series
(normals and abnormals cycling through the lesion families) are drawn from seeds that belong to
the site, written as DICOM, read back and preprocessed as the node does (``--tilt``, ``--slab``,
``--yaw`` switch the site-independent steps of ``triage_agent.preprocess``), and cached under
``--cache``. The model (default: the bundled weights) then scores the test series

* zero-shot: with its own normalisation and threshold;
* onboarded: adapted to the site as ``triage-agent onboard`` adapts it, by the same code
  (``triage_agent.onboarding.adapt_inputs``): the normals are split 2/3 : 1/3
  (``--holdout-fraction``, seeded by ``--seed``); with ``--fine-tune-steps`` the network is
  fine-tuned on the first part; the residual atlas is refitted on the first part (in bands of
  ``--atlas-height``) and the normalisation and threshold (``[triage] target_specificity``)
  calibrated on the held-out part.

Reported per site and mode: series AUROC (series score = max slice score), slice AUROC (a slice
is abnormal when its lesion mask is not empty), and specificity and sensitivity at the
threshold. Development and demo data only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_CACHE_VERSION = 2


@dataclass
class SiteCase:
    """One preprocessed series of a site."""

    key: str
    label: str
    x: np.ndarray  # (N,S,S) float32
    brain: np.ndarray  # (N,S,S) bool
    lesion: np.ndarray  # (N,S,S) bool

    @property
    def abnormal(self) -> bool:
        return self.label != "normal"


def site_plan(site: str, onboard: int, test_normals: int, test_abnormals: int
              ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(onboarding normals, test series) as (seed, label) lists; seeds are the site's own, so
    no two sites share a head and onboarding and test never overlap."""
    from triage_model.synth import make_dataset_plan

    base = int.from_bytes(hashlib.sha256(f"site-{site}".encode()).digest()[:4], "little")
    return (make_dataset_plan(onboard, 0, base + 1),
            make_dataset_plan(test_normals, test_abnormals, base + 2))


def _case_path(cache: Path, site: str, seed: int, label: str, matrix: int, size: int,
               opts: Any) -> Path:
    tag = f"v{_CACHE_VERSION}-m{matrix}-s{size}-t{int(opts.correct_tilt)}-" \
          f"sl{opts.slab_mm:g}-y{int(opts.align_yaw)}"
    if opts.max_noise_hu:
        tag += f"-n{opts.max_noise_hu:g}"
    return cache / site / tag / f"{seed}-{label}.npz"


def load_case(cache: Path, site: str, seed: int, label: str, *, matrix: int, size: int,
              opts: Any) -> SiteCase:
    """A site's series, preprocessed, from the cache or made (DICOM round trip) and cached."""
    from triage_model.synth import make_case

    from triage_agent.preprocess import model_inputs, read_series
    from triage_agent.synth_dicom import write_case_dicom

    path = _case_path(cache, site, seed, label, matrix, size, opts)
    if path.exists():
        with np.load(path) as z:
            return SiteCase(f"{site}/{seed}-{label}", label, z["x"].astype(np.float32) / 255.0,
                            z["brain"], z["lesion"])
    c = make_case(seed, label, matrix=matrix, site=site)
    with tempfile.TemporaryDirectory() as tmp:
        vol = read_series(write_case_dicom(c, Path(tmp), write_mask=False))
    mi = model_inputs(vol, size=size, lesion_mask=c.lesion_mask, options=opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    x8 = np.round(mi.x * 255.0).astype(np.uint8)
    lesion = mi.lesion if mi.lesion is not None else np.zeros(mi.x.shape, bool)
    np.savez_compressed(path.with_suffix(".tmp.npz"), x=x8, brain=mi.brain, lesion=lesion)
    path.with_suffix(".tmp.npz").replace(path)
    return SiteCase(f"{site}/{seed}-{label}", label, x8.astype(np.float32) / 255.0, mi.brain,
                    lesion)


def _slice_set(cases: list[SiteCase]) -> Any:
    from triage_model.train import SliceSet

    return SliceSet(np.concatenate([c.x for c in cases]),
                    np.concatenate([c.brain for c in cases]),
                    np.concatenate([np.full(len(c.x), i, np.int32) for i, c in enumerate(cases)]))


def score_cases(det: Any, cases: list[SiteCase]) -> list[np.ndarray]:
    """Slice scores of each series (one series at a time, slices in order)."""
    return [np.asarray(det.score(c.x, c.brain).score, np.float32) for c in cases]


def roc_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(y, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(np.asarray(s, float))
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def metrics(cases: list[SiteCase], scores: list[np.ndarray], threshold: float) -> dict[str, Any]:
    y = np.array([c.abnormal for c in cases])
    s = np.array([float(v.max()) if len(v) else -np.inf for v in scores])
    ys = np.concatenate([c.lesion.any((1, 2)) for c in cases])
    ss = np.concatenate(scores)
    flagged = s > threshold
    normals_max = s[~y]
    return {
        "series_auroc": roc_auc(y, s),
        "slice_auroc": roc_auc(ys, ss),
        "threshold": float(threshold),
        "specificity": float(np.mean(~flagged[~y])) if (~y).any() else None,
        "sensitivity": float(np.mean(flagged[y])) if y.any() else None,
        "normals": int((~y).sum()),
        "abnormals": int(y.sum()),
        "slices": int(len(ss)),
        # where the normals' top slice lies (relative height in the kept slices)
        "normal_top_slice_low_quarter": float(np.mean([
            (int(np.argmax(v)) + 0.5) / len(v) < 0.25 for v, c in zip(scores, cases, strict=True)
            if not c.abnormal and len(v)])) if normals_max.size else None,
    }


def onboard(ckpt: dict[str, Any], normals: list[SiteCase], *, holdout_fraction: float = 1 / 3,
            fine_tune_steps: int = 0, seed: int = 0, device: str = "cpu",
            height: str | None = None, progress: Any = None) -> dict[str, Any]:
    """The model adapted to a site as ``triage-agent onboard`` adapts it (``triage_agent.
    onboarding.adapt_inputs``: the same split, optional fine-tune of the network, atlas refit on
    the fit part, calibration at ``[triage]`` target specificity on the held-out part)."""
    from triage_model.scoring import slice_heights

    from triage_agent.config import TriageConfig
    from triage_agent.onboarding import NormalInputs, adapt_inputs, split

    inputs = NormalInputs([c.key for c in normals], [c.x for c in normals],
                          [c.brain for c in normals], [slice_heights(len(c.x)) for c in normals])
    fit_ids, held_ids = split(len(normals), holdout_fraction, seed)
    kw: dict[str, Any] = {} if progress is None else {"progress": progress}
    if height is not None:
        kw["height"] = height
    res = adapt_inputs(ckpt, inputs.subset(fit_ids), inputs.subset(held_ids), TriageConfig(),
                       fine_tune_steps=fine_tune_steps, seed=seed, device=device, **kw)
    return res.ckpt


def evaluate_site(site: str, args: argparse.Namespace, ckpt: dict[str, Any], opts: Any
                  ) -> dict[str, Any]:
    from triage_model.checkpoint import Detector

    t0 = time.perf_counter()
    plan_on, plan_test = site_plan(site, args.onboard, args.test_normals, args.test_abnormals)
    det0 = Detector(ckpt, device="cpu", runtime=args.runtime)
    size = det0.input_size

    def load(plan: list[tuple[int, str]], what: str) -> list[SiteCase]:
        out = []
        for i, (seed, label) in enumerate(plan):
            out.append(load_case(args.cache, site, seed, label, matrix=args.matrix, size=size,
                                 opts=opts))
            print(f"\r{site}: {what} {i + 1}/{len(plan)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        return out

    test = load(plan_test, "test series")
    normals = [] if args.zero_shot_only else load(plan_on, "onboarding normals")
    t_prep = time.perf_counter() - t0
    res: dict[str, Any] = {"site": site, "options": asdict(opts), "matrix": args.matrix,
                           "onboard_normals": len(normals)}
    t1 = time.perf_counter()
    labels = [c.label for c in test]
    if not args.onboarded_only:
        sc = score_cases(det0, test)
        res["zero_shot"] = metrics(test, sc, det0.threshold_for("max"))
        res["zero_shot"]["series_scores"] = [[lab, float(v.max())] for lab, v in
                                             zip(labels, sc, strict=True)]
        print(f"{site}: zero-shot {_row(res['zero_shot'])}", file=sys.stderr)
    if normals and not args.zero_shot_only:
        ck = onboard(ckpt, normals, holdout_fraction=args.holdout_fraction,
                     fine_tune_steps=args.fine_tune_steps, seed=args.seed,
                     height=args.atlas_height, progress=_bar)
        res["fine_tune"] = (ck.get("training") or {}).get("fine_tune")
        res["atlas_height"] = ck["training"]["atlas"]["height"]
        det1 = Detector(ck, device="cpu", runtime=args.runtime)
        sc = score_cases(det1, test)
        res["onboarded"] = metrics(test, sc, det1.threshold_for("max"))
        res["onboarded"]["series_scores"] = [[lab, float(v.max())] for lab, v in
                                             zip(labels, sc, strict=True)]
        print(f"{site}: onboarded {_row(res['onboarded'])}", file=sys.stderr)
    res["seconds"] = {"prepare": round(t_prep, 1), "score": round(time.perf_counter() - t1, 1)}
    return res


def _bar(it: Any, desc: str, total: int) -> Any:
    """A progress bar on stderr (tqdm, from the training extra) for the onboarding steps."""
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, file=sys.stderr, mininterval=5.0)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _row(m: dict[str, Any]) -> str:
    return (f"series AUROC {_f(m['series_auroc'])}, slice AUROC {_f(m['slice_auroc'])}, "
            f"specificity {_f(m['specificity'])}, sensitivity {_f(m['sensitivity'])} "
            f"at {m['threshold']:.3f}")


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| site | mode | series AUROC | slice AUROC | specificity | sensitivity | "
             "threshold | normals' top slice in lowest quarter |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for mode in ("zero_shot", "onboarded"):
            if mode not in r:
                continue
            m = r[mode]
            lines.append(f"| {r['site']} | {mode.replace('_', '-')} | {_f(m['series_auroc'])} | "
                         f"{_f(m['slice_auroc'])} | {_f(m['specificity'])} | "
                         f"{_f(m['sensitivity'])} | {m['threshold']:.3f} | "
                         f"{_f(m['normal_top_slice_low_quarter'])} |")
    return "\n".join(lines)


def _on_off(v: str) -> bool:
    if v not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected on or off")
    return v == "on"


def main(argv: list[str] | None = None) -> int:
    from triage_model.runtime import RUNTIMES
    from triage_model.scoring import ATLAS_HEIGHTS
    from triage_model.sites import SITES

    ap = argparse.ArgumentParser(prog="python -m triage_agent.site_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", action="append", required=True, choices=list(SITES),
                    help="site to evaluate (repeat for several)")
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint to evaluate (default: the bundled weights)")
    ap.add_argument("--onboard", type=int, default=20,
                    help="normal series to onboard from (default 20)")
    ap.add_argument("--test-normals", type=int, default=10, help="normal test series")
    ap.add_argument("--test-abnormals", type=int, default=11,
                    help="abnormal test series, cycling through the lesion families")
    ap.add_argument("--holdout-fraction", type=float, default=1 / 3,
                    help="share of the onboarding normals held out to calibrate the threshold; "
                         "the rest fit the atlas (and fine-tune the network), as in "
                         "triage-agent onboard (default 1/3)")
    ap.add_argument("--fine-tune-steps", type=int, default=None, metavar="N",
                    help="fine-tune the network on the fit part for N steps before the atlas "
                         "refit (0: off; default: triage-agent onboard's default)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the fit / held-out split of the onboarding normals (default 0)")
    ap.add_argument("--atlas-height", choices=ATLAS_HEIGHTS, default=None,
                    help="height bands of the refitted atlas (default: triage-agent onboard's, "
                         "brain_volume)")
    ap.add_argument("--matrix", type=int, default=256, help="in-plane matrix of the series")
    ap.add_argument("--tilt", type=_on_off, default=None, metavar="on|off",
                    help="gantry-tilt correction (default: the preprocessing default)")
    ap.add_argument("--slab", type=float, default=None, metavar="MM",
                    help="thin slices to slabs of about MM (0: off; default: the default)")
    ap.add_argument("--yaw", type=_on_off, default=None, metavar="on|off",
                    help="in-plane head-turn alignment (default: the preprocessing default)")
    ap.add_argument("--max-noise", type=float, default=None, metavar="HU",
                    help="limit the brain noise at model resolution to HU by in-plane "
                         "smoothing (0: off; default: the preprocessing default)")
    ap.add_argument("--runtime", choices=RUNTIMES, default="reference",
                    help="inference path ([model] runtime; default reference)")
    ap.add_argument("--zero-shot-only", action="store_true", help="skip onboarding")
    ap.add_argument("--onboarded-only", action="store_true",
                    help="skip the zero-shot scoring (when it is already measured)")
    ap.add_argument("--cache", type=Path, required=True,
                    help="folder for the preprocessed series (reused across runs)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from dataclasses import replace

    from triage_model.checkpoint import default_weights_path, read_checkpoint

    from triage_agent.preprocess import DEFAULT_OPTIONS

    opts = DEFAULT_OPTIONS
    if a.tilt is not None:
        opts = replace(opts, correct_tilt=a.tilt)
    if a.slab is not None:
        opts = replace(opts, slab_mm=float(a.slab))
    if a.yaw is not None:
        opts = replace(opts, align_yaw=a.yaw)
    if a.max_noise is not None:
        opts = replace(opts, max_noise_hu=float(a.max_noise))
    if not 0.0 < a.holdout_fraction < 1.0:
        print("error: --holdout-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    if a.fine_tune_steps is None:
        from triage_agent.onboarding import FINE_TUNE_STEPS

        a.fine_tune_steps = FINE_TUNE_STEPS
    if a.fine_tune_steps < 0:
        print("error: --fine-tune-steps must be 0 or more", file=sys.stderr)
        return 2
    ckpt, _ = read_checkpoint(a.model or default_weights_path())
    import torch
    import triage_model.atlas  # noqa: F401 - fail now, not after the scoring
    import triage_model.train  # noqa: F401

    import triage_agent.onboarding  # noqa: F401

    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [evaluate_site(s, a, ckpt, opts) for s in a.site]
    print(markdown(results))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results},
                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

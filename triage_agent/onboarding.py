"""Site onboarding: adapt the detector to a site from the site's own normal series.

``triage-agent onboard`` runs these stages:

1. ``select_series``: the node's selection rules (``[series]``) on each series' header; skipped
   series are listed with the reason, as the node would record it.
2. ``split``: the series are split, seeded, into the atlas-fit part and the held-out calibration
   part (about 2/3 : 1/3).
3. ``measure``: every selected series is read, preprocessed and passed once through the network;
   what is kept per slice is the plain residual map (the heat map), its statistic and the brain
   mask. Everything after this reuses those maps: the network runs once per slice. Thin-slice
   series of the atlas part are subsampled to ``FIT_MAX_SLICES`` evenly spaced slices.
4. ``adapt``: the residual atlas is refitted on the fit part (``triage_model.atlas``; its bands
   are bands of height in the head, ``ONBOARD_HEIGHT``), then the z-normalisation and the
   operating threshold at ``[triage] target_specificity`` are calibrated on the held-out part
   (``triage_model.train.calibrate_from_raw``, with the one threshold rule of
   ``triage_model.thresholds``). The held-out series are scored before (the model as it came)
   and after, for the report.
5. ``write_report``: FILE.report.md with PNG plots next to the model file.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from triage_model.atlas import plain_detector, stat_with_atlas, with_atlas
from triage_model.checkpoint import Detector
from triage_model.scoring import (
    AtlasFitter,
    ScoringConfig,
    apply_slice_context,
    atlas_heights,
    slice_heights,
)
from triage_model.train import SliceSet, calibrate_from_raw

from triage_agent.config import SeriesConfig, TriageConfig
from triage_agent.ingest import short_id
from triage_agent.selection import Skipped, select_series

log = logging.getLogger(__name__)

#: fewer normal series than this in either part of the split: the report warns
MIN_SERIES = 20
#: the worker's minimum of brain slices for a series to be assessable
MIN_BRAIN_SLICES = 5
#: brain slices per series used to fit the atlas (thin-slice series are subsampled evenly: the
#: atlas has 16 height bands); held-out series are always scored whole, as the node scores them
FIT_MAX_SLICES = 64
#: fine-tuning of the network on the fit part of the normals: steps (of 8 slices; 0 = off) and
#: learning rate (constant, a fresh Adam)
#: what the refitted atlas's height bands are bands of (``ResidualAtlas.height``): the share of
#: the series' brain volume below the slice, so that a site whose scans start lower or cut the
#: head at another pitch still compares each slice with normals at the same height in the head
ONBOARD_HEIGHT = "brain_volume"
FINE_TUNE_STEPS = 0
FINE_TUNE_LR = 2e-4

Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]


def _no_progress(it: Iterable[Any], _desc: str, _total: int) -> Iterable[Any]:
    return it


class OnboardingError(Exception):
    """Onboarding cannot go on; the message says what to fix."""


# ------------------------------------------------------------------------------------ measuring


@dataclass
class SiteNormals:
    """One network pass over a site's normal series: per kept slice (series in slice order) its
    series index, relative height, brain mask, plain residual map and raw statistics."""

    uids: list[str]
    series: np.ndarray  # (N,) int index into uids
    heights: np.ndarray  # (N,) relative height among the series' brain slices (slice_heights)
    brain: np.ndarray  # (N,S,S) bool
    heat: np.ndarray  # (N,S,S) float16, plain (pre-atlas) smoothed residual
    g_raw: np.ndarray  # (N,)
    r_plain: np.ndarray  # (N,) or (N,2) with symmetry
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.series.shape[0])

    def heights_for(self, kind: str) -> np.ndarray:
        """Each slice's height as an atlas of ``kind`` (``ResidualAtlas.height``) bins it."""
        if kind == "slice":
            return self.heights
        return atlas_heights(kind, self.brain, self.series)

    def slice_set(self) -> SliceSet:
        """The set as ``calibrate_from_raw`` takes it (it reads brain, series and the count)."""
        x = np.broadcast_to(np.zeros((1, 1, 1), np.float32), (len(self), 1, 1))
        return SliceSet(x, self.brain, self.series)


@dataclass
class NormalInputs:
    """A site's normal series read and preprocessed (the network has not run yet): per series
    its slices in order, brain masks and the slices' relative heights in the whole series."""

    uids: list[str]
    x: list[np.ndarray]  # per series (n,S,S) float32 in [0,1]
    brain: list[np.ndarray]  # per series (n,S,S) bool
    heights: list[np.ndarray]  # per series (n,)
    skipped: list[Skipped] = field(default_factory=list)

    def slice_set(self) -> SliceSet:
        """All slices as one set (series ids = position in ``uids``), e.g. to fine-tune on."""
        if not self.uids:
            raise OnboardingError("no usable normal series")
        return SliceSet(np.concatenate(self.x), np.concatenate(self.brain),
                        np.concatenate([np.full(len(v), i, np.int64)
                                        for i, v in enumerate(self.x)]))

    def subset(self, ids: list[int]) -> NormalInputs:
        return NormalInputs([self.uids[i] for i in ids], [self.x[i] for i in ids],
                            [self.brain[i] for i in ids], [self.heights[i] for i in ids])


def read_normals(groups: dict[str, list[Path]], input_size: int, *,
                 max_slices: int | None = None, desc: str = "read normals",
                 progress: Progress = _no_progress) -> NormalInputs:
    """Read and preprocess every series as the node does. Series that cannot be read or
    preprocessed, or keep fewer than ``MIN_BRAIN_SLICES`` brain slices, are skipped with the
    reason. ``max_slices`` keeps that many evenly spaced brain slices of a longer (thin-slice)
    series, with their heights in the whole series: enough to fit the atlas, whose bins are
    bands of height."""
    from triage_agent.preprocess import PreprocessError, model_inputs, read_series

    out = NormalInputs([], [], [], [])
    for uid, files in progress(list(groups.items()), desc, len(groups)):
        try:
            mi = model_inputs(read_series(files), size=input_size)
        except PreprocessError as e:
            out.skipped.append(Skipped(short_id(uid), f"cannot be read or preprocessed: {e}"))
            continue
        n = int(mi.x.shape[0])
        if n < MIN_BRAIN_SLICES:
            out.skipped.append(Skipped(short_id(uid), f"only {n} slice(s) with enough brain "
                                       f"(need {MIN_BRAIN_SLICES})"))
            continue
        keep = np.arange(n)
        if max_slices is not None and n > max_slices:
            keep = np.unique(np.round(np.linspace(0, n - 1, max_slices)).astype(int))
        out.uids.append(uid)
        out.x.append(np.asarray(mi.x[keep], np.float32))
        out.brain.append(np.asarray(mi.brain[keep], bool))
        out.heights.append(slice_heights(n)[keep])
    return out


def score_normals(inputs: NormalInputs, det: Detector, *, batch_size: int = 32,
                  desc: str = "score normals", progress: Progress = _no_progress) -> SiteNormals:
    """One pass of ``det`` (a plain detector, see ``triage_model.atlas.plain_detector``) over
    every series of ``inputs``."""
    s = det.input_size
    if not inputs.uids:
        return SiteNormals([], np.zeros(0, np.int64), np.zeros(0, np.float32),
                           np.zeros((0, s, s), bool), np.zeros((0, s, s), np.float16),
                           np.zeros(0, np.float32), np.zeros(0, np.float32),
                           list(inputs.skipped))
    g_all, r_all, heat_all = [], [], []
    for i in progress(range(len(inputs.uids)), desc, len(inputs.uids)):
        g, r, heat = det.raw_scores(inputs.x[i], inputs.brain[i], batch_size)
        g_all.append(g)
        r_all.append(r)
        heat_all.append(heat.astype(np.float16))
    return SiteNormals(list(inputs.uids),
                       np.concatenate([np.full(len(v), i, np.int64)
                                       for i, v in enumerate(inputs.x)]),
                       np.concatenate(inputs.heights), np.concatenate(inputs.brain),
                       np.concatenate(heat_all), np.concatenate(g_all), np.concatenate(r_all),
                       list(inputs.skipped))


def measure(groups: dict[str, list[Path]], det: Detector, *, batch_size: int = 32,
            max_slices: int | None = None, desc: str = "read and score normals",
            progress: Progress = _no_progress) -> SiteNormals:
    """``read_normals`` then ``score_normals`` with ``det``: one network pass per series."""
    inputs = read_normals(groups, det.input_size, max_slices=max_slices, desc=desc,
                          progress=progress)
    return score_normals(inputs, det, batch_size=batch_size, progress=_no_progress)


def split(n_series: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(atlas-fit, held-out) series indices, seeded; both parts non-empty."""
    if not 0.0 < holdout_fraction < 1.0:
        raise OnboardingError(f"--holdout-fraction must be between 0 and 1, got "
                              f"{holdout_fraction}")
    if n_series < 2:
        raise OnboardingError(f"{n_series} usable normal series; onboarding needs at least 2 "
                              f"(60 recommended: {2 * MIN_SERIES} to fit, {MIN_SERIES} to "
                              "calibrate)")
    ids = np.random.default_rng(seed).permutation(n_series)
    n_hold = min(n_series - 1, max(1, int(round(holdout_fraction * n_series))))
    return sorted(int(i) for i in ids[n_hold:]), sorted(int(i) for i in ids[:n_hold])


# ------------------------------------------------------------------------------------- scoring


def series_scores(det: Detector, data: SiteNormals, r_raw: np.ndarray, triage: TriageConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(series score, relative height of its top slice) per series of ``data``, as the node
    scores them with ``det``'s normalisation at ``[triage]`` lambda / aggregate / top_k."""
    g_raw = data.g_raw
    if det.scoring.slice_context:
        g_raw = apply_slice_context(g_raw, det.scoring.slice_context, data.series)
        r_raw = apply_slice_context(r_raw, det.scoring.slice_context, data.series)
    area = data.brain.reshape(len(data), -1).mean(1)
    score, _, _ = det.normalise(g_raw, r_raw, triage.lambda_, area)
    heights = data.heights
    from triage_model.scoring import aggregate

    out, top = [], []
    for sid in np.unique(data.series):
        idx = np.flatnonzero(data.series == sid)
        out.append(aggregate(score[idx], triage.aggregate, triage.top_k))
        top.append(float(heights[idx[int(np.argmax(score[idx]))]]))
    return np.asarray(out, np.float64), np.asarray(top, np.float64)


@dataclass
class Onboarded:
    ckpt: dict[str, Any]
    n_fit: int
    n_held: int
    before: np.ndarray  # held-out series scores with the model as it came
    after: np.ndarray  # ... with the onboarded model
    before_top: np.ndarray  # relative height of each held-out series' top slice
    after_top: np.ndarray
    threshold_before: float
    threshold_after: float
    target_specificity: float
    skipped: list[Skipped]
    warnings: list[str]

    @property
    def flags_before(self) -> float:
        return 100.0 * float(np.mean(self.before >= self.threshold_before))

    @property
    def flags_after(self) -> float:
        return 100.0 * float(np.mean(self.after >= self.threshold_after))


def adapt(ckpt: dict[str, Any], fit: SiteNormals, held: SiteNormals, triage: TriageConfig,
          *, bins: int | None = None, sigma: float | None = None, eps: float | None = None,
          height: str = ONBOARD_HEIGHT, source: str = "",
          before: tuple[dict[str, Any], SiteNormals] | None = None,
          progress: Progress = _no_progress) -> Onboarded:
    """Refit the atlas on the ``fit`` normals, calibrate on the ``held`` out ones (both
    measured with ``ckpt``'s network). ``before``: the model as it came and the held-out normals
    measured with its network, when ``ckpt``'s network is not that model's (fine-tuned); by
    default ``ckpt`` is the model as it came."""
    for part, name in ((fit, "to fit the atlas on"), (held, "held out to calibrate")):
        if not part.uids:
            raise OnboardingError(f"no usable normal series {name} (see the skipped series); "
                                  "give more normal series")
    base_ckpt, held_before = before if before is not None else (ckpt, held)
    sc = ScoringConfig.from_dict(base_ckpt.get("scoring"))
    before_det = Detector(base_ckpt, device="cpu")
    # the atlas settings of the model as it came (the shipped ones when it has no atlas)
    bins = bins or sc.atlas_bins or 16
    sigma = (before_det.atlas.sigma if before_det.atlas is not None else 1.5) \
        if sigma is None else sigma
    eps = (before_det.atlas.eps if before_det.atlas is not None else 0.002) \
        if eps is None else eps

    before_height = before_det.atlas.height if before_det.atlas is not None else "slice"
    r_before = stat_with_atlas(held_before.r_plain, held_before.heat, held_before.brain,
                               held_before.heights_for(before_height), before_det.atlas, sc)
    scores_before, before_top = series_scores(before_det, held_before, r_before, triage)
    threshold_before = before_det.threshold_for(triage.aggregate)

    fitter = AtlasFitter(bins, int(fit.heat.shape[-1]), height)
    chunk = 512
    heights = fit.heights_for(height)
    for s in progress(range(0, len(fit), chunk), "fit the residual atlas",
                      math.ceil(len(fit) / chunk)):
        sl = slice(s, s + chunk)
        fitter.add(fit.heat[sl], fit.brain[sl], heights[sl], fit.series[sl])
    atlas = fitter.finish(sigma, eps)
    new = with_atlas(ckpt, atlas, source=source)
    r_after = stat_with_atlas(held.r_plain, held.heat, held.brain, held.heights_for(height),
                              atlas, ScoringConfig.from_dict(new["scoring"]))
    new = calibrate_from_raw(new, held.slice_set(), held.g_raw, r_after,
                             held.heat.astype(np.float32),
                             target_specificity=triage.target_specificity, top_k=triage.top_k,
                             lambda_=triage.lambda_)
    after_det = Detector(new, device="cpu")
    after, after_top = series_scores(after_det, held, r_after, triage)
    result = Onboarded(
        ckpt=new, n_fit=len(fit.uids), n_held=len(held.uids), before=scores_before,
        after=after,
        before_top=before_top, after_top=after_top, threshold_before=threshold_before,
        threshold_after=after_det.threshold_for(triage.aggregate),
        target_specificity=triage.target_specificity, skipped=fit.skipped + held.skipped,
        warnings=[])
    result.warnings = warnings_for(result)
    training = dict(new.get("training") or {})
    training["onboarding"] = {
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "normal_series": result.n_fit + result.n_held, "fit_series": result.n_fit,
        "calibration_series": result.n_held, "skipped_series": len(result.skipped),
        "target_specificity": triage.target_specificity,
        "threshold_before": threshold_before, "threshold_after": result.threshold_after,
        "flags_per_100_normals_before": result.flags_before,
        "flags_per_100_normals_after": result.flags_after,
    }
    new["training"] = training
    return result


def warnings_for(r: Onboarded) -> list[str]:
    out = []
    if r.n_fit < MIN_SERIES:
        out.append(f"only {r.n_fit} normal series to fit the atlas on ({MIN_SERIES} or more "
                   "recommended, 40 better): the atlas is noisy and the held-out scores spread")
    if r.n_held < MIN_SERIES:
        out.append(f"only {r.n_held} held-out normal series to calibrate the threshold on "
                   f"({MIN_SERIES} or more recommended): the threshold moves with every series "
                   "and the expected flag rate is known only roughly "
                   f"(specificity 95 % interval {_interval(r)})")
    if r.skipped:
        out.append(f"{len(r.skipped)} series skipped (listed below); check that they are not "
                   "the site's usual head CT protocol")
    low = float(np.mean(r.after_top < 0.25)) if len(r.after_top) else 0.0
    if low > 0.5:
        out.append(f"after onboarding, {low:.0%} of the held-out normals still have their "
                   "highest-scoring slice in the lowest quarter of the head (skull base): "
                   "expect false flags there")
    if r.flags_after > 2 * 100 * (1 - r.target_specificity) + 10:
        out.append(f"{r.flags_after:.0f} in 100 held-out normals are flagged after onboarding; "
                   "the model does not separate this site's normals well")
    return out


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _interval(r: Onboarded) -> str:
    k = int(np.sum(r.after < r.threshold_after))
    lo, hi = _wilson(k, r.n_held)
    return f"{lo:.2f}-{hi:.2f}"


# ------------------------------------------------------------------------------------- report


def _network_line(r: Onboarded) -> str:
    ft = (r.ckpt.get("training") or {}).get("fine_tune")
    if not ft:
        return "as it came (not fine-tuned)"
    return (f"fine-tuned on the {r.n_fit} fit series for {ft['steps']} steps of "
            f"{ft['batch_size']} slices (learning rate {ft['lr']:g}, {ft['seconds'] / 60:.1f} "
            f"min on {ft['device']}); denoising loss {ft['rec_loss_first']:.3g} -> "
            f"{ft['rec_loss_last']:.3g}")


def report_paths(out: Path) -> dict[str, Path]:
    return {"report": out.with_name(out.name + ".report.md"),
            "scores": out.with_name(out.name + ".report-scores.png"),
            "heights": out.with_name(out.name + ".report-heights.png")}


def write_report(r: Onboarded, out: Path, *, normal_dirs: list[str], elapsed_s: float,
                 device: str, base_name: str) -> Path:
    """FILE.report.md and its PNG plots next to the model file ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = report_paths(out)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, scores, thr, title in (
            (axes[0], r.before, r.threshold_before, f"before: {base_name}"),
            (axes[1], r.after, r.threshold_after, "after onboarding")):
        ax.hist(scores, bins=min(30, max(5, len(scores))), color="#4c72b0", alpha=0.85)
        ax.axvline(thr, color="#c44e52", lw=2, label=f"threshold {thr:.3g}")
        flagged = int(np.sum(scores >= thr))
        ax.set_title(f"{title}\n{flagged} of {len(scores)} held-out normals flagged", fontsize=10)
        ax.set_xlabel("series score")
        ax.set_ylabel("normal series")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["scores"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    edges = [i / 8 for i in range(9)]
    ax.hist([r.before_top, r.after_top], bins=edges, label=["before", "after"],
            color=["#8c8c8c", "#4c72b0"])
    ax.set_xlabel("relative height of the top slice (0 = lowest brain slice, 1 = vertex)")
    ax.set_ylabel("held-out normal series")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("where the normals' highest-scoring slices lie", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["heights"], dpi=100)
    plt.close(fig)

    target_flags = 100 * (1 - r.target_specificity)
    lo, hi = _wilson(int(np.sum(r.after < r.threshold_after)), r.n_held)
    quarters = ["lowest", "second", "third", "top"]

    def share(tops: np.ndarray, q: int) -> str:
        return f"{np.mean((tops >= q / 4) & (tops < (q + 1) / 4 + (q == 3))):.0%}"

    lines = [
        f"# Site onboarding report: {out.name}",
        "",
        f"Created {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC from {base_name} in "
        f"{elapsed_s / 60:.1f} min on {device}.",
        "",
        "## Normal series",
        "",
        f"* folders: {', '.join(normal_dirs)}",
        f"* used: {r.n_fit + r.n_held} series: {r.n_fit} to refit the residual atlas, "
        f"{r.n_held} held out to calibrate the normalisation and the threshold",
        f"* network: {_network_line(r)}",
        f"* skipped: {len(r.skipped)}",
        "",
        "## Operating point",
        "",
        "| | threshold | held-out normals flagged | flags per 100 normal studies |",
        "|---|---|---|---|",
        f"| before ({base_name}) | {r.threshold_before:.4g} | "
        f"{int(np.sum(r.before >= r.threshold_before))} of {r.n_held} | {r.flags_before:.0f} |",
        f"| after onboarding | {r.threshold_after:.4g} | "
        f"{int(np.sum(r.after >= r.threshold_after))} of {r.n_held} | {r.flags_after:.0f} |",
        "",
        f"The threshold keeps at least {r.target_specificity:.1%} of the held-out normals below "
        f"it (`[triage] target_specificity`): expect about {target_flags:.0f} flags per 100 "
        f"normal studies. It was measured on those same {r.n_held} series; the specificity's "
        f"95 % interval with that many series is {lo:.2f}-{hi:.2f}.",
        "",
        f"![held-out normals' scores before and after]({paths['scores'].name})",
        "",
        "## Where the normals' top slices lie",
        "",
        "Relative height of each held-out normal series' highest-scoring slice among its brain "
        "slices (0 = lowest, at the skull base; 1 = vertex).",
        "",
        "| quarter of the head | before | after |",
        "|---|---|---|",
        *[f"| {quarters[q]} | {share(r.before_top, q)} | {share(r.after_top, q)} |"
          for q in range(4)],
        "",
        f"![top-slice heights]({paths['heights'].name})",
        "",
        "## Warnings",
        "",
        *([f"* {w}" for w in r.warnings] or ["None."]),
        "",
    ]
    if r.skipped:
        lines += ["## Skipped series", "", "| series | reason |", "|---|---|",
                  *[f"| {s.series} | {s.reason} |" for s in r.skipped], ""]
    lines += [
        "## Using the model",
        "",
        f"* try it: `triage-agent score --model {out.name} DIR` (scores at this file's "
        "threshold)",
        f"* use it: `[model] weights = \"{out}\"` in agent.toml, no `[triage] threshold` (the "
        "file's threshold applies), then `systemctl reload triage-agent` (SIGHUP)",
        "",
    ]
    paths["report"].write_text("\n".join(lines), encoding="utf-8")
    return paths["report"]


def adapt_inputs(ckpt: dict[str, Any], fit_in: NormalInputs, held_in: NormalInputs,
                 triage: TriageConfig, *, fine_tune_steps: int = 0,
                 fine_tune_lr: float = FINE_TUNE_LR, seed: int = 0, device: str = "cpu",
                 batch_size: int = 32, source: str = "", height: str = ONBOARD_HEIGHT,
                 progress: Progress = _no_progress) -> Onboarded:
    """From read normals to the onboarded checkpoint: with ``fine_tune_steps`` the network is
    first fine-tuned on the fit part (``triage_model.train.fine_tune``), then both parts are
    measured with it; the atlas is refitted on the fit part and the normalisation and threshold
    calibrated on the held-out part (``adapt``)."""
    from triage_model.checkpoint import CheckpointError

    try:
        base_det = plain_detector(ckpt, device)
    except CheckpointError as e:
        raise OnboardingError(f"this model cannot be onboarded: {e}") from e
    for part, name in ((fit_in, "to fit on"), (held_in, "held out to calibrate")):
        if not part.uids:
            raise OnboardingError(f"no usable normal series {name} (see the skipped series); "
                                  "give more normal series")
    before = None
    net_ckpt = ckpt
    if fine_tune_steps > 0:
        from triage_model.train import fine_tune

        held_before = score_normals(held_in, base_det, batch_size=batch_size,
                                    desc="score held-out normals (model as it came)",
                                    progress=progress)
        try:
            net_ckpt, _ = fine_tune(ckpt, fit_in.slice_set(), steps=fine_tune_steps,
                                    lr=fine_tune_lr, seed=seed, device=device,
                                    progress=progress)
        except ValueError as e:
            raise OnboardingError(f"the network cannot be fine-tuned: {e}") from e
        before = (ckpt, held_before)
        det = plain_detector(net_ckpt, device)
    else:
        det = base_det
    fit = score_normals(fit_in, det, batch_size=batch_size, desc="score normals (fit part)",
                        progress=progress)
    held = score_normals(held_in, det, batch_size=batch_size,
                         desc="score normals (held-out part)", progress=progress)
    fit.skipped = list(fit_in.skipped)
    held.skipped = list(held_in.skipped)
    res = adapt(net_ckpt, fit, held, triage, height=height, source=source, before=before,
                progress=progress)
    ft = (res.ckpt.get("training") or {}).get("fine_tune")
    res.ckpt["training"]["onboarding"].update(
        seed=seed, fine_tune_steps=int(ft["steps"]) if ft else 0)
    return res


def onboard_checkpoint(ckpt: dict[str, Any], groups: dict[str, list[Path]], *,
                       series_rules: SeriesConfig, triage: TriageConfig,
                       holdout_fraction: float = 1 / 3, seed: int = 0, device: str = "cpu",
                       batch_size: int = 32, source: str = "",
                       fine_tune_steps: int = FINE_TUNE_STEPS,
                       fine_tune_lr: float = FINE_TUNE_LR,
                       progress: Progress = _no_progress) -> Onboarded:
    """All stages from grouped DICOM files to the onboarded checkpoint (not written)."""
    from triage_model.checkpoint import CheckpointError

    selected, skipped = select_series(groups, series_rules)
    try:
        size = plain_detector(ckpt, "cpu").input_size
    except CheckpointError as e:
        raise OnboardingError(f"this model cannot be onboarded: {e}") from e
    uids = sorted(selected)
    fit_ids, held_ids = split(len(uids), holdout_fraction, seed)
    fit_in = read_normals({uids[i]: selected[uids[i]] for i in fit_ids}, size,
                          max_slices=FIT_MAX_SLICES, desc="read normals (fit part)",
                          progress=progress)
    held_in = read_normals({uids[i]: selected[uids[i]] for i in held_ids}, size,
                           desc="read normals (held-out part)", progress=progress)
    fit_in.skipped = skipped + fit_in.skipped
    res = adapt_inputs(ckpt, fit_in, held_in, triage, fine_tune_steps=fine_tune_steps,
                       fine_tune_lr=fine_tune_lr, seed=seed, device=device,
                       batch_size=batch_size, source=source, progress=progress)
    res.ckpt["training"]["onboarding"].update(holdout_fraction=holdout_fraction)
    return res

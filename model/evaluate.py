"""Evaluation harness: every method on one labelled set, the seed paper's Table 2 and more.

Inputs are preprocessed cases (arrays only; no DICOM here): ``EvalCase`` with slices, brain masks,
lesion masks and the series label. For each detector:

* slice level: AUROC, average precision (AP) and trapezoidal AUPR (``auc(recall, precision)``, as
  the seed's code computed it); a slice is abnormal when its lesion mask is non-empty;
* series level: AUROC and AP with the series score = max slice score and = mean of the top-k;
* pixel level (brain voxels of all slices pooled, MOOD style): AP; Dice at the pixel threshold
  giving 5 % FPR on normal validation voxels (stored in the checkpoint at calibration); the best
  Dice over thresholds chosen on the test set itself (an upper bound, labelled as such);
* operating point: sensitivity per lesion family and specificity on normals at the checkpoint's
  calibrated series threshold.

Writes ``table.md``, ``results.json``, ``roc.png``, ``pr.png`` and ``contact_sheet.png``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)
from triage_model.baselines import DISPLAY_NAMES
from triage_model.checkpoint import Detector, SliceScores
from triage_model.scoring import aggregate, combine

log = logging.getLogger(__name__)

MAX_PIXELS = 4_000_000  # pooled voxels kept for pixel AP / best Dice (uniform subsample beyond)


@dataclass
class EvalCase:
    case_id: str
    label: str  # "normal" or lesion family
    x: np.ndarray  # (N,S,S)
    brain: np.ndarray  # (N,S,S) bool
    lesion: np.ndarray | None  # (N,S,S) bool
    subtle: bool = False
    hu: np.ndarray | None = None

    @property
    def abnormal(self) -> bool:
        return self.label != "normal"

    def slice_labels(self) -> np.ndarray:
        if self.lesion is None or not self.abnormal:
            return np.zeros(len(self.x), bool)
        return np.asarray(self.lesion.reshape(len(self.x), -1).any(1), dtype=bool)


# ------------------------------------------------------------------------------------- metrics


def _safe(fn: Any, y: np.ndarray, s: np.ndarray) -> float | None:
    y = np.asarray(y).astype(bool)
    if y.all() or (~y).all():
        return None
    return float(fn(y, s))


def roc_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    return _safe(roc_auc_score, y, s)


def average_precision(y: np.ndarray, s: np.ndarray) -> float | None:
    return _safe(average_precision_score, y, s)


def aupr_trapz(y: np.ndarray, s: np.ndarray) -> float | None:
    """Area under the PR curve by the trapezoidal rule (the seed's convention)."""
    def f(yy: np.ndarray, ss: np.ndarray) -> float:
        p, r, _ = precision_recall_curve(yy, ss)
        return float(auc(r, p))
    return _safe(f, y, s)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    den = p.sum() + g.sum()
    return float(2.0 * (p & g).sum() / den) if den else 1.0


def best_dice(y: np.ndarray, s: np.ndarray) -> tuple[float | None, float | None]:
    """Max F1 (= Dice) over thresholds of the pooled PR curve: (dice, threshold). Upper bound."""
    y = np.asarray(y, bool)
    if not y.any():
        return None, None
    p, r, t = precision_recall_curve(y, s)
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    i = int(np.argmax(f1[:-1])) if len(t) else 0
    return float(f1[i]), (float(t[i]) if len(t) else None)


# --------------------------------------------------------------------------------- one detector


def score_cases(det: Detector, cases: list[EvalCase], lambda_: float = 0.5,
                batch_size: int = 32) -> list[Any]:
    return [det.score(c.x, c.brain, lambda_=lambda_, batch_size=batch_size, hu=c.hu)
            for c in cases]


def evaluate_detector(det: Detector, cases: list[EvalCase], *, lambda_: float = 0.5,
                      top_k: int = 3, batch_size: int = 32, seed: int = 0,
                      keep_scores: bool = True, scores: list[Any] | None = None,
                      name: str | None = None, operating_point: bool = True) -> dict[str, Any]:
    """Metrics of one detector; ``scores`` (per-case SliceScores) skips the scoring pass."""
    t0 = time.perf_counter()
    if scores is None:
        scores = score_cases(det, cases, lambda_, batch_size)
    t_score = time.perf_counter() - t0
    n_slices = sum(len(c.x) for c in cases)
    sl_y = np.concatenate([c.slice_labels() for c in cases])
    sl_s = np.concatenate([s.score for s in scores])
    ser_y = np.array([c.abnormal for c in cases])
    ser_max = np.array([aggregate(s.score, "max") if len(s.score) else -np.inf for s in scores])
    ser_top = np.array([aggregate(s.score, "topk_mean", top_k) if len(s.score) else -np.inf
                        for s in scores])
    res: dict[str, Any] = {
        "method": det.method,
        "name": name or det.ckpt.get("display_name") or DISPLAY_NAMES.get(det.method, det.method),
        "lambda": lambda_,
        "weights_sha256": det.weights_sha256,
        "n_series": len(cases), "n_abnormal_series": int(ser_y.sum()),
        "n_slices": int(n_slices), "n_abnormal_slices": int(sl_y.sum()),
        "score_seconds": t_score, "slices_per_s": n_slices / max(t_score, 1e-9),
        "slice": {"auroc": roc_auc(sl_y, sl_s), "ap": average_precision(sl_y, sl_s),
                  "aupr_trapz": aupr_trapz(sl_y, sl_s)},
        "series_max": {"auroc": roc_auc(ser_y, ser_max), "ap": average_precision(ser_y, ser_max)},
        f"series_top{top_k}": {"auroc": roc_auc(ser_y, ser_top),
                               "ap": average_precision(ser_y, ser_top)},
    }
    res["pixel"] = _pixel_metrics(det, cases, scores, seed) if det.uses["rec"] else None
    if not operating_point:
        res["operating_point"] = {"threshold": None, "aggregate": "max", "sensitivity": None,
                                  "specificity": None, "per_family_sensitivity": {},
                                  "subtle_sensitivity": None}
    else:
        res["operating_point"] = _operating_point(det.threshold_for("max"), cases, ser_max)
    if keep_scores:
        res["_curves"] = {"slice": (sl_y, sl_s), "series": (ser_y, ser_max)}
        res["_scores"] = scores
        res["_series_scores"] = [] if not operating_point else [
            {"case_id": c.case_id, "label": c.label, "subtle": c.subtle,
             "score_max": float(a), f"score_top{top_k}": float(b)}
            for c, a, b in zip(cases, ser_max, ser_top, strict=True)
        ]
    return res


def _pixel_metrics(det: Detector, cases: list[EvalCase], scores: list[Any],
                   seed: int) -> dict[str, Any] | None:
    """Heat map against lesion masks inside the brain: AP, AUROC, Dice at the checkpoint's 5 %
    voxel-FPR threshold and the best Dice; None without any lesion mask."""
    if not any(c.lesion is not None for c in cases):
        return None
    vals, labs = [], []
    tp = fp = fn = 0
    pthr = det.pixel_threshold
    for c, s in zip(cases, scores, strict=True):
        les = c.lesion if (c.lesion is not None and c.abnormal) else np.zeros_like(c.brain)
        v = s.heatmap[c.brain]
        lab = les[c.brain]
        vals.append(v.astype(np.float32))
        labs.append(lab)
        if pthr is not None:
            pred = v > pthr
            tp += int((pred & lab).sum())
            fp += int((pred & ~lab).sum())
            fn += int((~pred & lab).sum())
    v_all, l_all = np.concatenate(vals), np.concatenate(labs)
    n_vox = int(v_all.size)
    if n_vox > MAX_PIXELS:
        idx = np.random.default_rng(seed).choice(n_vox, MAX_PIXELS, replace=False)
        v_all, l_all = v_all[idx], l_all[idx]
    bd, bthr = best_dice(l_all, v_all)
    return {
        "ap": average_precision(l_all, v_all),
        "auroc": roc_auc(l_all, v_all),
        "dice_at_5fpr": (2 * tp / (2 * tp + fp + fn)) if pthr is not None and (tp + fp + fn)
        else None,
        "threshold_5fpr": pthr,
        "best_dice_upper_bound": bd, "best_dice_threshold": bthr,
        "n_voxels": n_vox, "n_voxels_used_for_ap": int(v_all.size),
    }


def _operating_point(thr: float, cases: list[EvalCase], ser_max: np.ndarray) -> dict[str, Any]:
    """Sensitivity (overall, per lesion family, subtle cases) and specificity of the series
    verdicts at ``thr`` (max aggregation)."""
    ser_y = np.array([c.abnormal for c in cases])
    pred = ser_max >= thr
    fam: dict[str, list[bool]] = defaultdict(list)
    fam_subtle: dict[str, list[bool]] = defaultdict(list)
    for c, p in zip(cases, pred, strict=True):
        if c.abnormal:
            fam[c.label].append(bool(p))
            if c.subtle:
                fam_subtle[c.label].append(bool(p))
    normals = ~ser_y
    return {
        "threshold": thr, "aggregate": "max",
        "sensitivity": float(pred[ser_y].mean()) if ser_y.any() else None,
        "specificity": float((~pred[normals]).mean()) if normals.any() else None,
        "per_family_sensitivity": {k: {"detected": int(sum(v)), "n": len(v),
                                       "sensitivity": float(np.mean(v))}
                                   for k, v in sorted(fam.items())},
        "subtle_sensitivity": (float(np.mean([p for v in fam_subtle.values() for p in v]))
                               if fam_subtle else None),
    }


# -------------------------------------------------------------------------------------- reports


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def markdown_table(results: list[dict[str, Any]], top_k: int = 3) -> str:
    head = ("| Method | Slice AUROC | Slice AP | Slice AUPR (trapz) | Series AUROC (max) | "
            f"Series AP (max) | Series AUROC (top-{top_k}) | Series AP (top-{top_k}) | Pixel AP | "
            "Dice @5% FPR | ⌈Dice⌉ (upper bound) | Sens. @thr | Spec. @thr |")
    sep = "|" + "---|" * 13
    rows = [head, sep]
    for r in results:
        px = r.get("pixel") or {}
        op = r["operating_point"]
        tk = r.get(f"series_top{top_k}", {})
        rows.append(
            f"| {r['name']} | {_f(r['slice']['auroc'])} | {_f(r['slice']['ap'])} | "
            f"{_f(r['slice']['aupr_trapz'])} | {_f(r['series_max']['auroc'])} | "
            f"{_f(r['series_max']['ap'])} | {_f(tk.get('auroc'))} | {_f(tk.get('ap'))} | "
            f"{_f(px.get('ap'))} | {_f(px.get('dice_at_5fpr'))} | "
            f"{_f(px.get('best_dice_upper_bound'))} | {_f(op['sensitivity'])} | "
            f"{_f(op['specificity'])} |"
        )
    fams = sorted({f for r in results for f in r["operating_point"]["per_family_sensitivity"]})
    if fams:
        rows += ["", "Series sensitivity per lesion family at each method's calibrated operating "
                     "threshold (max aggregation, 95 % specificity on normal validation series):",
                 "", "| Family | " + " | ".join(r["name"] for r in results) + " |",
                 "|---|" + "---|" * len(results)]
        for f in fams:
            cells = []
            for r in results:
                d = r["operating_point"]["per_family_sensitivity"].get(f)
                cells.append("—" if d is None else f"{d['detected']}/{d['n']}")
            rows.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_curves(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind, fname in (("roc", "roc.png"), ("pr", "pr.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        for ax, level in zip(axes, ("slice", "series"), strict=True):
            for r in results:
                y, s = r["_curves"][level]
                if y.all() or (~y).all():
                    continue
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(y, s)
                    ax.plot(fpr, tpr, label=f"{r['name']} ({roc_auc(y, s):.3f})")
                else:
                    p, rc, _ = precision_recall_curve(y, s)
                    ax.plot(rc, p, label=f"{r['name']} ({average_precision(y, s):.3f})")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], "k:", lw=0.8)
                ax.set_xlabel("false positive rate")
                ax.set_ylabel("true positive rate")
            else:
                ax.set_xlabel("recall")
                ax.set_ylabel("precision")
            ax.set_title(f"{level} level {'ROC (AUROC)' if kind == 'roc' else 'PR (AP)'}"
                         + (" — series score = max" if level == "series" else ""))
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def contact_sheet(result: dict[str, Any], cases: list[EvalCase], out: Path, n: int = 16,
                  cols: int = 4) -> Path:
    """The ``n`` highest-scoring slices of the test set with heat maps and lesion outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result["_scores"]
    items = [(float(s.score[i]), ci, i) for ci, s in enumerate(scores) for i in range(len(s.score))]
    items.sort(reverse=True)
    items = items[:n]
    rows = max(1, int(np.ceil(len(items) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (sc, ci, i) in zip(axes, items, strict=False):
        c, s = cases[ci], scores[ci]
        ax.imshow(c.x[i], cmap="gray", vmin=0, vmax=1)
        h = s.heatmap[i]
        if h.max() > 0:
            hm = np.ma.masked_where(h <= np.quantile(h[c.brain[i]], 0.9) if c.brain[i].any()
                                    else h <= 0, h)
            ax.imshow(hm, cmap="hot", alpha=0.55)
        if c.lesion is not None and c.lesion[i].any():
            ax.contour(c.lesion[i], levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{c.label}{' (subtle)' if c.subtle else ''}\n{c.case_id} z{i} "
                     f"score {sc:.2f}", fontsize=7)
    fig.suptitle(f"Top-scoring slices: {result['name']} (green = true lesion, hot = residual "
                 f"heat map, top decile in brain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if not k.startswith("_")} | {
        "series_scores": r.get("_series_scores", [])}


def evaluate(detectors: Iterable[Detector], cases: list[EvalCase], out_dir: Path | str, *,
             lambda_: float = 0.5, top_k: int = 3, batch_size: int = 32,
             primary: str | None = None, meta: dict[str, Any] | None = None,
             progress: bool = True) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    dets = list(detectors)
    for det in dets:
        log.info("evaluating %s on %d series", det.method, len(cases))
        if progress:
            print(f"evaluating {det.method} ...", flush=True)
        r = evaluate_detector(det, cases, lambda_=lambda_, top_k=top_k, batch_size=batch_size)
        results.append(r)
        if progress:
            print(f"  slice AUROC {_f(r['slice']['auroc'])}  series AUROC "
                  f"{_f(r['series_max']['auroc'])}  ({r['score_seconds']:.0f} s)", flush=True)
        if det.uses["geo"] and det.uses["rec"]:
            # the two terms of the same model alone (no extra inference; no calibrated threshold)
            for lam, label in ((0.0, "s_g only, λ=0"), (1.0, "s_r only, λ=1")):
                derived = [SliceScores(score=np.asarray(combine(s.s_g, s.s_r, lam), np.float32),
                                       s_g=s.s_g, s_r=s.s_r, heatmap=s.heatmap)
                           for s in r["_scores"]]
                d = evaluate_detector(det, cases, lambda_=lam, top_k=top_k, scores=derived,
                                      name=f"{r['name']}: {label}", operating_point=False)
                d["derived_from"] = det.method
                results.append(d)
    table = markdown_table(results, top_k)
    (out_dir / "table.md").write_text(table)
    files = [str(p) for p in plot_curves(results, out_dir)]
    prim = next((r for r in results if r["method"] == primary), None) if primary else None
    prim = prim or next((r for r in results if r["method"] == "multitask"), results[0])
    prim = next((r for r in results if r is prim or (r["method"] == prim["method"]
                                                      and "derived_from" not in r)), prim)
    files.append(str(contact_sheet(prim, cases, out_dir / "contact_sheet.png")))
    doc = {
        "meta": meta or {}, "lambda": lambda_, "top_k": top_k,
        "cases": [{"case_id": c.case_id, "label": c.label, "subtle": c.subtle,
                   "n_slices": int(len(c.x)), "n_lesion_slices": int(c.slice_labels().sum())}
                  for c in cases],
        "results": [_public(r) for r in results],
        "table_markdown": table, "files": files,
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=float))
    return doc

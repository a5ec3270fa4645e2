"""``triage-agent synth OUT``: write synthetic head-CT series with lesion masks and labels.

For development, demos and benchmarks only: a site trains on its own normal studies.
Layout: ``OUT/<case_id>/CT0001.dcm...``, ``OUT/<case_id>/mask.npz`` (key ``mask``, (Z, Y, X)
bool in the order ``preprocess.read_series`` returns), ``OUT/<case_id>/case.json`` and
``OUT/labels.csv``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

LABEL_COLUMNS = (
    "case_id",
    "series_instance_uid",
    "study_instance_uid",
    "label",
    "subtle",
    "seed",
    "n_slices",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic head-CT DICOM series with lesion masks (development/demo only)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--normals", type=int, default=10, help="number of normal cases")
    p.add_argument("--abnormals", type=int, default=10, help="number of abnormal cases")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same files)")
    p.add_argument("--matrix", type=int, default=512, help="in-plane matrix (default 512)")
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated lesion families to cycle through (default: all)",
    )
    p.add_argument(
        "--subtle",
        choices=("auto", "yes", "no"),
        default="auto",
        help="force subtle / obvious lesions (default: drawn per case)",
    )
    p.add_argument(
        "--site",
        default="train",
        help="site profile (scanner, acquisition, head pose, anatomy): train (default, the "
        "bundled model's), development sites A-C, test sites D-F; see triage_model.sites",
    )
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="worker processes (default 1)")
    p.add_argument(
        "--preview",
        type=Path,
        default=None,
        metavar="PNG",
        help="also write a brain-window montage of the first 16 cases to PNG",
    )
    p.set_defaults(func=run)


def preview_slice(hu: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The most telling axial slice of a case, cropped to the head: the slice with the most
    lesion, or for a normal the level of the lateral ventricles (~55 % up the series)."""
    import numpy as np

    area = mask.sum(axis=(1, 2))
    z = int(np.argmax(area)) if area.any() else int(round(0.55 * (hu.shape[0] - 1)))
    sl = hu[z]
    head = sl > -300
    if head.any():
        ys, xs = np.nonzero(head)
        m = max(4, sl.shape[0] // 50)
        y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, sl.shape[0])
        x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, sl.shape[1])
    else:
        y0, y1, x0, x1 = 0, sl.shape[0], 0, sl.shape[1]
    return sl[y0:y1, x0:x1].astype(np.float32), mask[z, y0:y1, x0:x1], z


def render_preview(
    tiles: list[tuple[np.ndarray, np.ndarray, str]],
    path: Path,
    *,
    ncols: int = 4,
    outline: bool = True,
    title: str | None = None,
    dpi: int = 90,
) -> Path:
    """Montage of (slice HU, lesion mask, caption) tiles in a W80/L40 brain window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tiles)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.5 * nrows), squeeze=False)
    fig.patch.set_facecolor("black")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (sl, m, caption) in zip(axes.flat, tiles, strict=False):
        ax.imshow(sl, cmap="gray", vmin=0, vmax=80, interpolation="bilinear")
        if outline and m.any():
            ax.contour(m, levels=[0.5], colors="red", linewidths=0.7)
        ax.set_title(caption, color="white", fontsize=9)
    if title:
        fig.suptitle(title, color="white", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="black")
    plt.close(fig)
    return path


def caption(label: str, subtle: bool, thickness: float) -> str:
    return f"{label.replace('_', ' ')}{' (subtle)' if subtle else ''}\n{thickness:g} mm"


def _plan(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    from triage_model.synth import LESION_FAMILIES, make_dataset_plan

    plan = make_dataset_plan(args.normals, args.abnormals, args.seed)
    if args.families:
        fams = [f.strip() for f in args.families.split(",") if f.strip()]
        bad = [f for f in fams if f not in LESION_FAMILIES]
        if bad:
            raise ValueError(
                f"unknown lesion famil{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
                f"choose from {', '.join(LESION_FAMILIES)}"
            )
        it = iter(range(10**9))
        plan = [(s, lab if lab == "normal" else fams[next(it) % len(fams)]) for s, lab in plan]
    width = max(3, len(str(len(plan))))
    return [(f"case{i:0{width}d}-{lab}", s, lab) for i, (s, lab) in enumerate(plan)]


def _one(job: tuple[str, int, str, str, int, str, bool, str]) -> dict[str, object]:
    case_id, seed, label, out, matrix, subtle_opt, want_preview, site = job
    from triage_model.synth import make_case

    from triage_agent.synth_dicom import case_key, synthetic_patient, uid_for, write_case_dicom

    subtle = {"auto": None, "yes": True, "no": False}[subtle_opt]
    t = time.perf_counter()
    case = make_case(seed, label, subtle=subtle, matrix=matrix, site=site)
    name, pid = synthetic_patient(seed)
    paths = write_case_dicom(case, Path(out) / case_id, patient_name=name, patient_id=pid)
    key = case_key(case)
    preview = None
    if want_preview:
        sl, m, _ = preview_slice(case.hu, case.lesion_mask)
        preview = (sl, m, caption(case.label, case.subtle, case.spacing_mm[0]))
    return {
        "_preview": preview,
        "case_id": case_id,
        "series_instance_uid": uid_for("series", *key, 2),
        "study_instance_uid": uid_for("study", *key),
        "label": case.label,
        "subtle": int(case.subtle),
        "seed": seed,
        "n_slices": len(paths),
        "_seconds": time.perf_counter() - t,
    }


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        from triage_model.sites import get_site

        get_site(args.site)
        plan = _plan(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not plan:
        print("error: nothing to do (--normals and --abnormals are both 0)", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (cid, s, lab, str(out), args.matrix, args.subtle, args.preview is not None and i < 16,
         args.site)
        for i, (cid, s, lab) in enumerate(plan)
    ]
    t0 = time.perf_counter()
    rows: list[dict[str, object]] = []
    bar = tqdm(total=len(jobs), desc="synth", unit="case")
    try:
        if args.jobs > 1:
            with get_context("spawn").Pool(args.jobs) as pool:
                for row in pool.imap(_one, jobs):
                    rows.append(row)
                    bar.update()
        else:
            for j in jobs:
                rows.append(_one(j))
                bar.update()
    finally:
        bar.close()
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    wall = time.perf_counter() - t0
    counts = Counter(str(r["label"]) for r in rows)
    subtle = sum(int(r["subtle"]) for r in rows)  # type: ignore[call-overload]
    slices = sum(int(r["n_slices"]) for r in rows)  # type: ignore[call-overload]
    print(
        f"wrote {len(rows)} series ({slices} slices) to {out} in {wall:.1f} s "
        f"({wall / len(rows):.2f} s/case with {args.jobs} job(s)); {subtle} subtle"
    )
    for lab, n in sorted(counts.items()):
        print(f"  {lab:32s} {n}")
    print(f"labels: {out / 'labels.csv'}")
    if args.preview is not None:
        tiles = [r["_preview"] for r in rows if r.get("_preview") is not None]
        render_preview(tiles, args.preview)  # type: ignore[arg-type]
        print(f"preview: {args.preview}")
    return 0


def write_examples(path: Path, *, outline: bool = True, dpi: int = 72) -> Path:
    """Regenerate the README picture (``docs/synth_examples.png``): three normals (with their
    calcified variants named), every lesion family, and two subtle presentations."""
    from triage_model.synth import LESION_FAMILIES, make_case

    specs: list[tuple[int, str, bool | None]] = [(1001, "normal", None), (1002, "normal", None),
                                                 (1003, "normal", None)]  # fmt: skip
    specs += [(2000 + i, f, False) for i, f in enumerate(LESION_FAMILIES)]
    specs += [(3001, "subdural_haematoma", True), (3002, "territorial_ischaemia", True)]
    tiles = []
    for seed, label, subtle in specs:
        c = make_case(seed, label, subtle=subtle)
        sl, m, _ = preview_slice(c.hu, c.lesion_mask)
        cap = caption(c.label, c.subtle, c.spacing_mm[0])
        if label == "normal":
            calc = [k.removesuffix("_calc") for k, on in c.meta["variants"].items() if on]
            extra = f" (calcified {', '.join(calc)})" if calc else ""
            cap = f"normal{extra}\n{c.spacing_mm[0]:g} mm"
        tiles.append((sl, m, cap))
    title = "Synthetic non-contrast head CT (W80/L40) - development and demo data only"
    return render_preview(tiles, path, ncols=4, outline=outline, title=title, dpi=dpi)

"""The operating threshold for a target specificity, from normal series' scores.

One rule for every place that calibrates (training, ``python -m triage_model.atlas``,
``triage-agent calibrate``, ``triage-agent onboard``), so that the same normals give the same
threshold whichever command measured them.
"""

from __future__ import annotations

import math

import numpy as np


def threshold_for_specificity(normal_scores: np.ndarray | list[float],
                              specificity: float) -> float:
    """Smallest threshold that keeps at least ``specificity`` of the normal series below it
    (``score >= threshold`` is abnormal), placed midway to the next normal score so that it does
    not sit on a data point. When every normal must stay below, 5 % above the highest."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).reshape(-1))
    if s.size == 0:
        raise ValueError("no normal scores to calibrate a threshold on")
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity must be in (0, 1), got {specificity}")
    k = min(len(s), max(1, math.ceil(specificity * len(s) - 1e-9)))
    if k >= len(s):
        return float(s[-1] + max(1e-6, 0.05 * abs(s[-1])))
    return float((s[k - 1] + s[k]) / 2)

"""The operating point: the threshold in force and the worklist priority bands.

One object decides both the verdict ("abnormal" when ``score >= threshold``) and the priority of
every scored series. It is resolved once from the loaded model and ``[triage]``: the threshold
calibrated into the model file applies unless ``agent.toml`` sets ``[triage] threshold``; a
configured threshold that differs from the model's is applied but reported (``mismatch``), at
start-up and by ``triage-agent check-config``, so that a stale threshold does not outlive a
model switch unnoticed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from triage_agent.config import PriorityBand, TriageConfig

ROUTINE = "routine"


def verdict_for(score: float | None, threshold: float) -> str:
    """"abnormal" when ``score >= threshold``, "normal" below, "not_assessable" without a score."""
    if score is None:
        return "not_assessable"
    return "abnormal" if score >= threshold else "normal"


def thresholds_differ(a: float, b: float) -> bool:
    """True when two thresholds differ beyond the rounding of ``calibrate --write`` (6 digits)."""
    return not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    bands: tuple[PriorityBand, ...] = ()
    #: where the threshold comes from: "model" (the file's calibration), "config"
    #: ([triage] threshold) or "command line"
    source: str = "model"
    #: the threshold calibrated into the loaded model for the configured aggregation
    model_threshold: float | None = None

    @classmethod
    def resolve(cls, triage: TriageConfig, model_threshold: float, *,
                override: float | None = None, use_config_threshold: bool = True
                ) -> OperatingPoint:
        """The operating point for a model whose file holds ``model_threshold``.

        ``override`` (a command-line ``--threshold``) wins; then ``[triage] threshold`` unless
        ``use_config_threshold`` is False (``score --model FILE`` scores with FILE's own
        threshold); else the model's."""
        bands = tuple(triage.priority_bands)
        if override is not None:
            return cls(float(override), bands, "command line", float(model_threshold))
        if use_config_threshold and triage.threshold is not None:
            return cls(float(triage.threshold), bands, "config", float(model_threshold))
        return cls(float(model_threshold), bands, "model", float(model_threshold))

    @property
    def mismatch(self) -> str | None:
        """A warning when ``[triage] threshold`` overrides a different model threshold."""
        if (self.source != "config" or self.model_threshold is None
                or not thresholds_differ(self.threshold, self.model_threshold)):
            return None
        return mismatch_message(self.threshold, self.model_threshold)

    def verdict(self, score: float | None) -> str:
        return verdict_for(score, self.threshold)

    def priority(self, score: float | None) -> str:
        """Worklist priority: "routine" below the threshold (verdict normal) or without a score;
        else the first band (highest bound first) the score reaches, else "routine"."""
        if self.verdict(score) != "abnormal":
            return ROUTINE
        assert score is not None
        for band in self.ranked_bands():
            if score >= band.bound(self.threshold):
                return band.name
        return ROUTINE

    def ranked_bands(self) -> list[PriorityBand]:
        """The priority bands from the most urgent (highest bound at this threshold) down."""
        return sorted(self.bands, key=lambda b: -b.bound(self.threshold))


def mismatch_message(config_threshold: float, model_threshold: float) -> str:
    return (f"[triage] threshold = {config_threshold:.6g} in the configuration overrides the "
            f"threshold {model_threshold:.6g} calibrated into the model file; remove [triage] "
            "threshold to use the model's, or keep it if it was calibrated for this model "
            "(`triage-agent calibrate`)")

"""Site profiles for the synthetic head-CT generator: a multi-site test bed.

Why: a detector tuned on one generator says little about the next hospital. Real sites differ
in scanner (quantum noise, smooth or sharp reconstruction kernel, streak and beam-hardening
artefacts at the skull base, residual cupping), acquisition (slice thickness, field of view and
pixel spacing, gantry tilt), head positioning and patients (skull base and skull thickness,
sinus and mastoid disease, calcifications, age and atrophy). Each ``SiteProfile`` sets those
knobs; ``triage_model.synth.make_case(seed, label, site=NAME)`` draws a head for that site.

Roles (fixed here, so that no method is chosen on the sites it is judged on):

* ``train`` - the generator's original settings; the bundled detector was trained on it.
* ``A``, ``B``, ``C`` - development sites: preprocessing and onboarding choices are measured on
  these.
* ``D``, ``E``, ``F`` - test sites: scored once, after every choice is made.

The profiles:

* ``A`` (dev): sharp bone-type kernel, 5-8 HU noise, thin 1.0-1.25 mm slices, 220-250 mm field
  of view, little tilt, calm heads; an older population (atrophy, more calcifications).
* ``B`` (dev): smooth kernel, 2-3 HU noise, 5 mm slices, gantry tilt 12-20 degrees, small
  180-210 mm field of view, strong cupping, heads pitched forward.
* ``C`` (dev): standard kernel, strong streaks and beam hardening, 2.5-3 mm slices, large
  260-320 mm field of view, heads turned and tilted up to 10 degrees, sinus disease and
  sclerotic mastoids.
* ``D`` (test): sharp kernel, 6-8 HU noise, 0.625 mm slices, tilt up to 10 degrees, heads up to
  10 degrees each way, a young population.
* ``E`` (test): smooth kernel, 5 mm slices, tilt 15-20 degrees, moderate streaks, cupping, an
  older population with many calcifications.
* ``F`` (test): standard kernel, 2-4 HU noise, 3 mm slices, 240-300 mm field of view, heads up to
  10 degrees each way, thick skulls and dense skull base, sinus disease.

This module is plain data (no numpy): ``synth`` imports it, never the reverse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

Range = tuple[float, float]

KERNELS = ("smooth", "standard", "sharp")


@dataclass(frozen=True)
class SiteProfile:
    """The generator's knobs for one site. Ranges are drawn uniformly per case."""

    name: str
    role: str  # "train", "dev" or "test"
    description: str
    # scanner
    noise_hu: Range = (2.7, 4.6)  # quantum noise SD at 5 mm (thinner slices are noisier)
    noise_clip: Range = (3.0, 6.0)  # the SD after the thickness factor stays in this range
    kernel: str = "standard"
    streak_hu: Range = (0.0, 0.0)  # amplitude of streaks from dense skull-base bone
    beam_hardening_hu: Range = (0.0, 0.0)  # dark band between the petrous bones
    cupping_hu: float = 2.0  # residual radial bias, +-
    # acquisition
    thickness_mm: tuple[float, ...] = (2.5, 3.0, 4.0, 5.0, 5.0)
    fov_mm: Range = (205.0, 256.0)
    tilt_deg: Range = (0.0, 0.0)  # gantry tilt
    # head pose (degrees): yaw (turn), pitch (nod), roll (side tilt)
    yaw_deg: Range = (-7.0, 7.0)
    pitch_deg: Range = (-12.0, 10.0)
    roll_deg: Range = (-5.0, 5.0)
    # anatomy
    vent_grow_mm: Range = (-1.0, 1.5)  # ventricle size (age)
    sulc_open: Range = (0.0, 0.12)  # sulcal widening (age, atrophy)
    calc_scale: float = 1.0  # multiplies the chance of each calcified normal variant
    skull_scale: Range = (1.0, 1.0)  # multiplies skull thickness
    base_bone_scale: Range = (1.0, 1.0)  # multiplies skull-base bone density
    sinus_fluid_p: float = 0.0  # chance of fluid / mucosal thickening in the sinuses
    mastoid_sclerosis_p: float = 0.0  # chance of poorly pneumatised (bony) mastoids

    def __post_init__(self) -> None:
        if self.role not in ("train", "dev", "test"):
            raise ValueError(f"site {self.name}: role must be train, dev or test")
        if self.kernel not in KERNELS:
            raise ValueError(f"site {self.name}: kernel must be one of {KERNELS}")
        for f in ("noise_hu", "noise_clip", "fov_mm", "tilt_deg", "yaw_deg", "pitch_deg",
                  "roll_deg", "vent_grow_mm", "sulc_open", "skull_scale", "base_bone_scale",
                  "streak_hu", "beam_hardening_hu"):
            lo, hi = getattr(self, f)
            if lo > hi:
                raise ValueError(f"site {self.name}: {f} range is reversed")
        if not self.thickness_mm or min(self.thickness_mm) <= 0:
            raise ValueError(f"site {self.name}: thickness_mm needs positive values")
        if abs(self.tilt_deg[1]) > 30 or abs(self.tilt_deg[0]) > 30:
            raise ValueError(f"site {self.name}: gantry tilt beyond 30 degrees")

    @property
    def is_train(self) -> bool:
        return self.name == "train"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


SITES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile("train", "train", "the generator's original settings (bundled model)"),
        SiteProfile(
            "A", "dev", "sharp kernel, noisy thin slices, older patients",
            noise_hu=(2.2, 3.2), noise_clip=(5.0, 8.0), kernel="sharp",
            streak_hu=(0.0, 6.0), thickness_mm=(1.0, 1.25), fov_mm=(220.0, 250.0),
            yaw_deg=(-4.0, 4.0), pitch_deg=(-8.0, 6.0), roll_deg=(-3.0, 3.0),
            vent_grow_mm=(0.0, 3.0), sulc_open=(0.05, 0.16), calc_scale=1.6,
        ),
        SiteProfile(
            "B", "dev", "smooth kernel, thick tilted slices, small field of view, cupping",
            noise_hu=(2.0, 3.0), noise_clip=(2.0, 3.0), kernel="smooth",
            cupping_hu=8.0, thickness_mm=(5.0,), fov_mm=(180.0, 210.0),
            tilt_deg=(12.0, 20.0), pitch_deg=(-2.0, 10.0),
        ),
        SiteProfile(
            "C", "dev", "streaks and beam hardening, large field of view, turned heads, sinus "
            "disease",
            noise_hu=(3.0, 4.5), noise_clip=(3.0, 6.0), streak_hu=(10.0, 25.0),
            beam_hardening_hu=(6.0, 14.0), thickness_mm=(2.5, 3.0), fov_mm=(260.0, 320.0),
            yaw_deg=(-10.0, 10.0), pitch_deg=(-10.0, 10.0), roll_deg=(-10.0, 10.0),
            sinus_fluid_p=0.5, mastoid_sclerosis_p=0.4, base_bone_scale=(1.0, 1.3),
        ),
        SiteProfile(
            "D", "test", "sharp kernel, very thin noisy slices, some tilt, young patients",
            noise_hu=(2.0, 2.6), noise_clip=(6.0, 8.0), kernel="sharp",
            streak_hu=(0.0, 8.0), thickness_mm=(0.625,), fov_mm=(200.0, 240.0),
            tilt_deg=(0.0, 10.0), yaw_deg=(-10.0, 10.0), pitch_deg=(-10.0, 10.0),
            roll_deg=(-10.0, 10.0), vent_grow_mm=(-1.5, 0.5), sulc_open=(0.0, 0.05),
            calc_scale=0.6,
        ),
        SiteProfile(
            "E", "test", "smooth kernel, strongly tilted thick slices, streaks, older patients",
            noise_hu=(2.5, 3.5), noise_clip=(2.5, 4.0), kernel="smooth",
            streak_hu=(5.0, 15.0), beam_hardening_hu=(3.0, 8.0), cupping_hu=6.0,
            thickness_mm=(5.0,), fov_mm=(200.0, 240.0), tilt_deg=(15.0, 20.0),
            vent_grow_mm=(0.5, 3.0), sulc_open=(0.06, 0.16), calc_scale=1.8,
        ),
        SiteProfile(
            "F", "test", "large field of view, turned heads, thick skulls, sinus disease",
            noise_hu=(2.0, 3.5), noise_clip=(2.0, 4.0), streak_hu=(4.0, 12.0),
            beam_hardening_hu=(2.0, 6.0), thickness_mm=(3.0,), fov_mm=(240.0, 300.0),
            yaw_deg=(-10.0, 10.0), pitch_deg=(-10.0, 10.0), roll_deg=(-10.0, 10.0),
            skull_scale=(1.1, 1.35), base_bone_scale=(1.1, 1.4), sinus_fluid_p=0.4,
            mastoid_sclerosis_p=0.3,
        ),
    )
}

DEV_SITES: tuple[str, ...] = tuple(n for n, p in SITES.items() if p.role == "dev")
TEST_SITES: tuple[str, ...] = tuple(n for n, p in SITES.items() if p.role == "test")


def get_site(site: str | SiteProfile | None) -> SiteProfile:
    """A profile by name (``None`` is the training site); a clear error for unknown names."""
    if site is None:
        return SITES["train"]
    if isinstance(site, SiteProfile):
        return site
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
    return SITES[site]

"""Typed configuration loaded once from ``agent.toml``.

Every setting lives in one pydantic model so that an admin's typo is caught at start-up with the
offending key named, instead of surfacing as a strange failure at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = Path("agent.toml")
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, <= 16


class ConfigError(Exception):
    """The configuration file cannot be used; the message lists every problem by key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not AE_TITLE_RE.match(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters, no backslash, not blank")
    return value.strip()


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


class NodeConfig(_Section):
    ae_title: AETitle = "TRIAGE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(30.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    max_pdu_bytes: int = Field(262144, ge=0, le=2**31 - 1)
    # Hard limits stock pynetdicom lacks (a 1-byte-per-minute sender would hold a slot forever).
    max_association_s: float = Field(3600.0, gt=0)
    idle_timeout_s: float = Field(60.0, gt=0)
    max_connections_per_address: int = Field(5, ge=1)
    # Association slots kept for listed callers ([security] priority_ae_titles/priority_networks):
    # unlisted callers may hold at most max_associations - reserved_slots. Nothing is held back
    # while nobody is listed.
    reserved_slots: int = Field(4, ge=0)
    max_dataset_mb: float = Field(1024.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("bind_address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class TLSConfig(_Section):
    certificate: Path
    private_key: Path
    ca_certificate: Path
    require_client_certificate: bool = True


class SecurityConfig(_Section):
    allowed_calling_ae_titles: list[AETitle] = Field(default_factory=list)
    allowed_networks: list[str] = Field(default_factory=list)
    # Listed modalities: callers that may use the [node] reserved_slots and are exempt from the
    # per-address connection cap. A caller is listed when its calling AE title is in
    # priority_ae_titles (if given) and its address in priority_networks (if given).
    priority_ae_titles: list[AETitle] = Field(default_factory=list)
    priority_networks: list[str] = Field(default_factory=list)
    tls: TLSConfig | None = None

    @field_validator("allowed_calling_ae_titles", "priority_ae_titles")
    @classmethod
    def _aes(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]

    @field_validator("allowed_networks", "priority_networks")
    @classmethod
    def _nets(cls, values: list[str]) -> list[str]:
        for v in values:
            ipaddress.ip_network(v, strict=False)
        return values

    def address_allowed(self, address: str) -> bool:
        if not self.allowed_networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)

    @property
    def open_to_anyone(self) -> bool:
        """No calling-AE or network allow-list and no client certificates: anyone who can reach
        the port may store here."""
        return (not self.allowed_calling_ae_titles and not self.allowed_networks
                and not (self.tls is not None and self.tls.require_client_certificate))

    @property
    def lists_priority_callers(self) -> bool:
        return bool(self.priority_ae_titles or self.priority_networks)

    def priority_listed(self, ae_title: str, address: str) -> bool:
        """A listed modality: AE title in priority_ae_titles (if any) and address in
        priority_networks (if any); nobody is listed while both are empty."""
        if not self.lists_priority_callers:
            return False
        if self.priority_ae_titles and ae_title.strip() not in self.priority_ae_titles:
            return False
        if not self.priority_networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.priority_networks)

    def calling_ae_allowed(self, ae_title: str) -> bool:
        return not self.allowed_calling_ae_titles or ae_title.strip() in {
            a.strip() for a in self.allowed_calling_ae_titles
        }


class StorageConfig(_Section):
    root: Path = Path("var/storage")
    high_water_percent: float = Field(90.0, gt=0, le=100)
    # A C-STORE that cannot commit its row within this many seconds (database locked or busy)
    # is answered 0xA700, well before a modality's DIMSE timeout (often 30 s).
    store_commit_timeout_s: float = Field(10.0, gt=0, le=600)
    # Storage SOP classes (UIDs) accepted besides CT/Enhanced CT; recorded as ignored, no pixels kept.
    extra_sop_classes: list[str] = Field(default_factory=list)


class DatabaseConfig(_Section):
    url: str = "sqlite:///var/triage.db"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not (value.startswith("sqlite:") or value.startswith("postgresql")):
            raise ValueError("use sqlite:///PATH or postgresql+psycopg2://USER:PASS@HOST/DB")
        return value


#: ConvolutionKernel patterns of bone/sharp reconstructions (GE BONE/BONEPLUS/LUNG/DETAIL/EDGE,
#: Siemens H/J/Hr/Br/Qr 50 and above, Canon/Toshiba FC30 and above, Philips D/E/L/Y*).
SHARP_KERNELS = ("(?i)bone", "(?i)sharp", "(?i)lung", "(?i)detail", "(?i)edge",
                 "(?i)^(H|J|Hr|Br|Qr|I|B)[5-9][0-9]", "(?i)^FC[3-9][0-9]", "(?i)^(D|E|L|Y[A-D])$")


class SeriesConfig(_Section):
    quiet_period_s: float = Field(10.0, gt=0)
    sweep_interval_s: float = Field(2.0, gt=0)
    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    body_parts: list[str] = Field(default_factory=lambda: ["HEAD", "BRAIN", "SKULL", ""])
    description_include: list[str] = Field(default_factory=list)
    description_exclude: list[str] = Field(
        default_factory=lambda: ["(?i)scout", "(?i)topogram", "(?i)localizer", "(?i)dose"]
    )
    min_slices: int = Field(20, ge=1)
    slice_thickness_mm: tuple[float, float] = (0.5, 6.0)
    axial_only: bool = True
    axial_tolerance_deg: float = Field(20.0, ge=0, le=90)
    # The study rule: which of a study's eligible series is scored (selection.rank_key).
    report: Literal["one_per_study", "every_eligible_series"] = "one_per_study"
    late_series: Literal["skip", "score_if_preferred"] = "skip"
    avoid_kernel: list[str] = Field(default_factory=lambda: list(SHARP_KERNELS))
    avoid_description: list[str] = Field(
        default_factory=lambda: ["(?i)bone", "(?i)sharp", "(?i)lung", "(?i)\\bMIP\\b"]
    )
    prefer_description: list[str] = Field(default_factory=list)
    preferred_thickness_mm: float = Field(5.0, gt=0)

    @field_validator("description_include", "description_exclude", "avoid_kernel",
                     "avoid_description", "prefer_description")
    @classmethod
    def _regexes(cls, values: list[str]) -> list[str]:
        for v in values:
            re.compile(v)
        return values

    @model_validator(mode="after")
    def _range(self) -> SeriesConfig:
        lo, hi = self.slice_thickness_mm
        if not 0 < lo <= hi:
            raise ValueError("slice_thickness_mm must be [min, max] with 0 < min <= max")
        return self


class DestinationTLS(_Section):
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificate: Path


class DestinationConfig(_Section):
    name: str = ""
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLS | None = None
    # Associations open at once to this destination (its delivery lane's threads).
    concurrency: int = Field(1, ge=1, le=32)

    _ae = field_validator("ae_title")(_check_ae_title)


class HL7DestinationConfig(_Section):
    """A RIS that receives an HL7 v2 ORU^R01 per result over MLLP."""

    name: str = Field(min_length=1, max_length=32)
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "TRIAGE_AGENT"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout_s: float = Field(10.0, gt=0)


class DicomWebDestinationConfig(_Section):
    """A PACS or archive that takes results over DICOMweb STOW-RS (HTTP POST of the SR and heat
    maps to ``<url>/studies``). Secrets live in files readable by the node only, read at each send
    (so a rotated token needs no restart) and never logged."""

    name: str = Field(min_length=1, max_length=32)
    # Base URL of the DICOMweb service, e.g. "https://pacs.example.org/dicom-web".
    url: str
    # HTTP basic authentication: the user name here, the password in password_file.
    username: str = ""
    password_file: Path | None = None
    # Or an OAuth/bearer token in token_file (sent as "Authorization: Bearer ...").
    token_file: Path | None = None
    # CA bundle (PEM) that signs the server's certificate; unset = the system's trusted CAs.
    ca_certificate: Path | None = None
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("give an http:// or https:// URL with a host, e.g. "
                             "https://pacs.example.org/dicom-web")
        if parts.username or parts.password:
            raise ValueError("credentials do not belong in the URL: use username and "
                             "password_file, or token_file")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> DicomWebDestinationConfig:
        if bool(self.username) != (self.password_file is not None):
            raise ValueError("basic authentication needs both username and password_file")
        if self.token_file is not None and self.username:
            raise ValueError("give either username/password_file or token_file, not both")
        return self


class PriorityBand(_Section):
    """A worklist priority for abnormal series. ``above_threshold`` is relative to the operating
    threshold in force (``score >= threshold + above_threshold``), so bands keep their meaning
    when the model or its calibration changes; ``min_score`` is an absolute series score. Give
    exactly one. Series below the threshold (verdict normal) are always "routine"."""

    name: str
    min_score: float | None = None
    above_threshold: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_bound(self) -> PriorityBand:
        if (self.min_score is None) == (self.above_threshold is None):
            raise ValueError(f"priority band {self.name!r}: give exactly one of min_score and "
                             "above_threshold")
        return self

    def bound(self, threshold: float) -> float:
        return self.min_score if self.min_score is not None else threshold + float(
            self.above_threshold or 0.0)


class TriageConfig(_Section):
    # None = the operating threshold calibrated into the model file. A value here overrides it
    # (reported at start and by check-config when it differs from the model's).
    threshold: float | None = None
    # Share of normal series kept below the threshold by `triage-agent onboard` and `calibrate`.
    target_specificity: float = Field(0.95, gt=0.5, lt=1.0)
    lambda_: float = Field(0.5, ge=0, le=1, alias="lambda")
    mode: Literal["active", "shadow"] = "active"
    aggregate: Literal["max", "topk_mean"] = "max"
    top_k: int = Field(3, ge=1)
    priority_bands: list[PriorityBand] = Field(
        default_factory=lambda: [
            PriorityBand(name="urgent", above_threshold=4.0),
            PriorityBand(name="high", above_threshold=0.0),
        ]
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelConfig(_Section):
    # Empty = the bundled demo checkpoint in model/weights/.
    weights: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Slices per network call. The fast path's working memory grows with it (the bundled
    # model's scorer holds about 0.65 GB at 8 and 1.4 GB at 32, at the same CPU speed); on a
    # GPU 32 keeps it busier.
    batch_size: int = Field(8, ge=1)
    # "fast": the same scores as "reference" (to float rounding, < 1e-4) in less time
    # (triage_model.runtime: ONNX Runtime when installed, else PyTorch channels-last);
    # "reference": one network pass per test-time view, as the detector was calibrated with;
    # "lean": fewer network passes on an ensemble (triage_model.runtime.LEAN_PASSES): other
    # scores, accuracy measured in docs/experiments.md.
    runtime: Literal["fast", "reference", "lean"] = "fast"


class DriftConfig(_Section):
    """The drift alarm (triage_agent/drift.py): the flag rate of the last ``window`` assessable
    series against the rate the threshold was calibrated for, by an exact binomial test."""

    enabled: bool = True
    window: int = Field(50, ge=5, le=10000)
    min_series: int = Field(20, ge=1)
    alpha: float = Field(0.01, gt=0, lt=0.5)
    # None = 1 - target specificity of the model's calibration (or of [triage]).
    expected_flag_rate: float | None = Field(None, gt=0, lt=1)
    interval_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _min_le_window(self) -> DriftConfig:
        if self.min_series > self.window:
            raise ValueError("min_series must not exceed window")
        return self


class OnboardingConfig(_Section):
    # The [[destinations]] entry (by name) that `onboard --from-pacs` retrieves normals from
    # with C-FIND and C-GET; empty = the first destination.
    pacs: str = ""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class WorkerConfig(_Section):
    # Scoring worker threads; default: one per usable CPU core (at most 64), so a burst of series
    # is read, preprocessed, scored and published side by side. 0 = receive and queue only.
    count: int = Field(default_factory=lambda: min(64, usable_cores()), ge=0, le=64)
    # Series the detector scores at the same time in one process (each with all the cores'
    # threads); the workers read, preprocess and publish side by side regardless. 1 spends the
    # least CPU per series on small machines; raise it on many-core machines.
    model_slots: int = Field(1, ge=1, le=64)
    lease_s: float = Field(300.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    poll_interval_s: float = Field(1.0, gt=0)


class OutputsConfig(_Section):
    # SeriesDescription of the SR series; the verdict is appended ("AI TRIAGE REPORT: ABNORMAL").
    sr_series_description: str = Field("AI TRIAGE REPORT", max_length=40)
    # SeriesDescription of the heat-map series; "{verdict}" and "{score}" are filled in.
    sc_series_description: str = Field("AI TRIAGE {verdict} {score}", max_length=48)
    # Also send heat maps for studies judged normal (they are always sent for abnormal ones).
    sc_for_normal: bool = False
    # How many of the most suspicious slices the SR references and the heat-map series shows.
    top_k_slices: int = Field(5, ge=1, le=50)
    # How the heat map is drawn over the brain window (W80/L40): "outline" (a line around the
    # region, filled with a tint that keeps the density's grey level) or "blend" (the region
    # coloured, hiding part of the density).
    overlay: Literal["outline", "blend"] = "outline"
    # Strength of the outline's tint or the blend's colour, 0..1 (0: outline only).
    overlay_opacity: float = Field(
        0.3, ge=0, le=1, validation_alias=AliasChoices("overlay_opacity", "heatmap_opacity")
    )
    # Perceptually uniform matplotlib colormap for the heat map.
    colormap: str = "inferno"
    # Manufacturer written into the SR device observer and algorithm identification.
    manufacturer: str = "triage-agent project"


class DeliveryConfig(_Section):
    # Attempts per object and destination before it is dead-lettered (transient failures only).
    max_attempts: int = Field(8, ge=1)
    # Exponential backoff: first retry after backoff_base_s, doubling, capped at backoff_cap_s.
    backoff_base_s: float = Field(5.0, gt=0)
    backoff_cap_s: float = Field(600.0, gt=0)
    # How often the sender looks for due deliveries (seconds).
    interval_s: float = Field(2.0, gt=0)
    # Association/DIMSE timeouts towards destinations (seconds).
    timeout_s: float = Field(30.0, gt=0)
    # Circuit breaker per destination: after breaker_failures attempts in a row that get no
    # answer (refused, timed out, aborted) its lane stops trying for breaker_cooldown_s, doubling
    # after each unanswered probe up to breaker_cooldown_cap_s, then tries one delivery and
    # resumes when it is answered. Waiting deliveries spend no attempts.
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(60.0, gt=0)
    breaker_cooldown_cap_s: float = Field(600.0, gt=0)


class HttpConfig(_Section):
    enabled: bool = True
    # Loopback by default: the status page shows study details; expose it deliberately.
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Show patient name and ID on the status page (admins only; off by default).
    show_patient_identifiers: bool = False
    # Rows on the status page.
    page_size: int = Field(50, ge=1, le=1000)

    @field_validator("bind_address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "text" for people, "json" (one object per line) for log collectors.
    format: Literal["text", "json"] = "text"


class AgentConfig(_Section):
    node: NodeConfig = NodeConfig()
    security: SecurityConfig = SecurityConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    series: SeriesConfig = SeriesConfig()
    destinations: list[DestinationConfig] = Field(default_factory=list)
    hl7_destinations: list[HL7DestinationConfig] = Field(default_factory=list)
    dicomweb_destinations: list[DicomWebDestinationConfig] = Field(default_factory=list)
    triage: TriageConfig = TriageConfig()
    model: ModelConfig = ModelConfig()
    worker: WorkerConfig = WorkerConfig()
    outputs: OutputsConfig = OutputsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    drift: DriftConfig = DriftConfig()
    onboarding: OnboardingConfig = OnboardingConfig()

    @model_validator(mode="after")
    def _unlisted_callers_keep_a_slot(self) -> AgentConfig:
        if (self.security.lists_priority_callers
                and self.node.reserved_slots >= self.node.max_associations):
            raise ValueError(f"node.reserved_slots ({self.node.reserved_slots}) must be below "
                             f"node.max_associations ({self.node.max_associations}): unlisted "
                             "callers need at least one association slot")
        return self

    @model_validator(mode="after")
    def _unique_destination_names(self) -> AgentConfig:
        for field_name, names in (
            ("destinations", [d.name or f"{d.ae_title}@{d.host}:{d.port}" for d in self.destinations]),
            ("hl7_destinations", [d.name for d in self.hl7_destinations]),
            ("dicomweb_destinations", [d.name for d in self.dicomweb_destinations]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{field_name}: names must be unique (repeated: {', '.join(dupes)})")
        return self

    def destinations_summary(self) -> str:
        """'2 DICOM, 1 DICOMweb, 1 HL7 destination(s)': every kind the node delivers to."""
        kinds = [(len(self.destinations), "DICOM"), (len(self.dicomweb_destinations), "DICOMweb"),
                 (len(self.hl7_destinations), "HL7")]
        parts = [f"{n} {kind}" for n, kind in kinds if n]
        return (", ".join(parts) or "no") + " destination(s)"

    # Relative paths in the file are resolved against the file's folder, so the agent behaves the
    # same whatever directory systemd or a shell starts it from.
    def resolved(self, base: Path) -> AgentConfig:
        def fix(p: Path) -> Path:
            return p if p.is_absolute() else Path(os.path.normpath(base / p))

        storage = self.storage.model_copy(update={"root": fix(self.storage.root)})
        db_url = self.database.url
        prefix = "sqlite:///"
        if db_url.startswith(prefix) and not db_url.startswith(prefix + "/"):
            rest = db_url[len(prefix) :]
            if rest and rest != ":memory:":
                db_url = prefix + str(fix(Path(rest)))
        model = self.model
        if model.weights is not None:
            model = model.model_copy(update={"weights": fix(model.weights)})
        web = [d.model_copy(update={k: fix(v) for k in ("password_file", "token_file",
                                                         "ca_certificate")
                                    if (v := getattr(d, k)) is not None})
               for d in self.dicomweb_destinations]
        return self.model_copy(
            update={
                "storage": storage,
                "database": self.database.model_copy(update={"url": db_url}),
                "model": model,
                "dicomweb_destinations": web,
            }
        )


def format_errors(err: ValidationError) -> list[str]:
    """One line per problem: the dotted key, what is wrong, and the value given."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling against the documented agent.toml)"
        given = e.get("input")
        suffix = f" (given: {given!r})" if given is not None and not isinstance(given, dict) else ""
        lines.append(f"{key}: {msg}{suffix}")
    return lines


def load_config(path: Path | str = DEFAULT_CONFIG_PATH) -> AgentConfig:
    """Load and validate ``agent.toml``; raise ConfigError naming every bad key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: configuration file not found (pass --config PATH)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            f"{path}: {len(e.errors())} problem(s):\n" + "\n".join("  " + s for s in format_errors(e))
        ) from e
    return cfg.resolved(path.resolve().parent)

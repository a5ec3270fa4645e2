"""ORM tables. Every arrow of the flow in docs/architecture.md is a row here, so a crash resumes
from the last committed state and ``triage-agent status`` can say where each series is."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


def state_type(states: type[enum.StrEnum]) -> Enum:
    """A state column: VARCHAR(16) holding the enum's values, as the migrations create it (no
    database enum type, no CHECK constraint); rows load as enum members, and assigning a value
    the enum does not know fails before it reaches the database."""
    return Enum(states, native_enum=False, create_constraint=False, length=16,
                values_callable=lambda e: [m.value for m in e], validate_strings=True)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    SKIPPED = "skipped"
    SCORED = "scored"
    DELIVERED = "delivered"
    FAILED = "failed"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # dead letter: attempts exhausted or a permanent error
    CANCELLED = "cancelled"  # superseded by late instances before it ran


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # PHI: kept for the status page behind an admin switch; never logged.
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float)
    orientation: Mapped[str | None] = mapped_column(String(32))  # e.g. "axial:2.0" (plane:tilt)
    convolution_kernel: Mapped[str | None] = mapped_column(String(64))  # the study rule's kernel
    state: Mapped[SeriesState] = mapped_column(state_type(SeriesState),
                                               default=SeriesState.RECEIVING, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Image frames received: instance_count for classic images, the sum of NumberOfFrames for
    # enhanced (multi-frame) ones; what the selection's min_slices counts.
    frame_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # Bumped every time the series completes; a job belongs to one generation, so late slices
    # give a new generation and a re-run, and a retried sweep cannot queue the same one twice.
    generation: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    path: Mapped[str | None] = mapped_column(String(255))  # relative to storage root; None if ignored
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("series_id", "kind", "generation", name="uq_jobs_series_kind_generation"),
        Index("ix_jobs_claim", "state", "priority", "available_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="score")
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[JobState] = mapped_column(state_type(JobState), default=JobState.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
    worker_id: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    series: Mapped[Series] = relationship()


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    score: Mapped[float | None] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class SliceScore(Base):
    __tablename__ = "slice_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    slice_index: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)


class Output(Base):
    """A DICOM object we built (SR or SC), stored under the storage root until delivered."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # "sr" | "sc"
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(255))  # relative to the storage root
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"  # dead letter: permanent failure or attempts exhausted


class Delivery(Base):
    """One output to one destination: the unit of retry and of dead-lettering."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_deliveries_output_destination"),
        Index("ix_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(state_type(DeliveryState),
                                                 default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Event(Base):
    """Audit trail. ``detail`` may name AE titles, addresses and UIDs; never patient identifiers."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    status: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)

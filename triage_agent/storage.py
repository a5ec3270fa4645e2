"""Atomic, content-addressed instance files.

Paths are built from SHA-256 digests only, never from strings a peer sent, so no UID can steer a
write outside the storage root (pynetdicom #823, DCMTK CVE-2022-2119). A file is visible under its
final name only after its bytes and its directory entry are on stable storage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


class StorageFullError(OSError):
    """Storage is above the configured high-water mark; the sender should retry later."""


def uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()


def content_digest(chunks: list[bytes]) -> str:
    """SHA-256 of the file exactly as written, so `sha256sum` on disk matches the database."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Storage:
    root: Path
    high_water_percent: float = 90.0
    _usage_checked_at: float = -1e9
    _used_bytes: int = 0
    _total_bytes: int = 1

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        for sub in ("dicom", "tmp", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def instance_relpath(self, study_uid: str, series_uid: str, digest: str) -> str:
        return f"dicom/{uid_hash(study_uid)[:20]}/{uid_hash(series_uid)[:20]}/{digest}.dcm"

    def quarantine_relpath(self, digest: str) -> str:
        return f"quarantine/{digest}.dcm"

    def abspath(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if not p.is_relative_to(self.root):  # defence in depth; relpaths are ours
            raise ValueError("path outside the storage root")
        return p

    def used_percent(self) -> float:
        usage = shutil.disk_usage(self.root)
        return 100.0 * usage.used / usage.total if usage.total else 100.0

    def check_space(self) -> None:
        """Raise StorageFullError above the high-water mark.

        statvfs is read at most once a second; in between, bytes we write are added to the last
        reading, so a fast sender cannot overshoot the mark within that second.
        """
        now = time.monotonic()
        if now - self._usage_checked_at > 1.0:
            usage = shutil.disk_usage(self.root)
            self._used_bytes, self._total_bytes = usage.used, max(1, usage.total)
            self._usage_checked_at = now
        if 100.0 * self._used_bytes / self._total_bytes >= self.high_water_percent:
            raise StorageFullError(
                f"storage above high-water mark ({self.high_water_percent:.0f} % used)"
            )

    def write_atomic(self, relpath: str, chunks: list[bytes]) -> Path:
        """Write, fsync, rename into place, fsync the directory. Returns the final path."""
        final = self.abspath(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "xb") as f:
                for c in chunks:
                    f.write(c)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._used_bytes += sum(len(c) for c in chunks)
        fsync_dir(final.parent)
        return final

    def remove(self, relpath: str) -> None:
        self.abspath(relpath).unlink(missing_ok=True)

    def clean_tmp(self) -> int:
        """Remove temp files left by a crash; returns how many."""
        n = 0
        for p in self.tmp_dir.glob("*.part"):
            p.unlink(missing_ok=True)
            n += 1
        return n

"""Per-GPU overhead: stored by ``exl2opt calibrate``, looked up by plan, fit and search. Stdlib only.

The *overhead* is the device memory a run uses beyond what torch's caching allocator holds: the
CUDA context, cuBLAS, the kernel images of torch, exllamav2's extension and flash-attn (bytes). It
depends on the GPU, its driver and the torch build, so a measurement is stored under that triple
(``GpuIdentity.key``) in ``<cache>/calibration.json`` (``EXL2OPT_CACHE`` or ``~/.cache/exl2opt``).

Which figure a command uses (:func:`choose_overhead`), in order:
    1. ``--overhead`` when given;
    2. the stored figure of every NVIDIA GPU visible here (``nvidia-smi``, no CUDA initialisation),
       when all of them are calibrated for this driver and torch: the largest of them;
    3. the format's default for uncalibrated GPUs (exl2: ``DEFAULT_OVERHEAD_BYTES``, 1 GiB, sources
       in docs/calibration.md).
The choice comes with one line saying which figure it is, which the commands print.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import StorageError

STORE_NAME = "calibration.json"
#: seconds nvidia-smi may take to list the GPUs
NVIDIA_SMI_TIMEOUT_S = 10
_MIB = 2**20


@dataclass(frozen=True)
class GpuIdentity:
    """What a stored overhead is valid for: GPU name, driver version, torch version."""

    name: str
    driver: str
    torch: str

    @property
    def key(self) -> str:
        return f"{self.name} | driver {self.driver} | torch {self.torch}"


@dataclass(frozen=True)
class CalibrationRecord:
    """One measurement (bytes). ``overhead_bytes`` = ``used_bytes - reserved_bytes``."""

    gpu: GpuIdentity
    overhead_bytes: int
    used_bytes: int
    reserved_bytes: int
    total_bytes: int
    initialised: tuple[str, ...]  #: what was initialised before measuring (torch, exllamav2_ext, cublas, ...)
    measured_at: str

    def line(self) -> str:
        return (f"{self.gpu.key}: {self.overhead_bytes / _MIB:.0f} MiB beyond torch's reserved "
                f"{self.reserved_bytes / _MIB:.0f} MiB (device used {self.used_bytes / _MIB:.0f} MiB of "
                f"{self.total_bytes / _MIB:.0f} MiB; initialised {', '.join(self.initialised)}; {self.measured_at})")


def store_path() -> Path:
    """Where calibrations are stored."""
    from optimizer.sources.cache import default_cache_dir

    return default_cache_dir() / STORE_NAME


def _record_of(doc: Any) -> CalibrationRecord:
    g = doc["gpu"]
    return CalibrationRecord(gpu=GpuIdentity(name=str(g["name"]), driver=str(g["driver"]), torch=str(g["torch"])),
                             overhead_bytes=int(doc["overhead_bytes"]), used_bytes=int(doc["used_bytes"]),
                             reserved_bytes=int(doc["reserved_bytes"]), total_bytes=int(doc["total_bytes"]),
                             initialised=tuple(str(x) for x in doc["initialised"]), measured_at=str(doc["measured_at"]))


def load_records(*, path: Path | None = None) -> dict[str, CalibrationRecord]:
    """Stored calibrations by ``GpuIdentity.key``; an unreadable or damaged store counts as empty."""
    p = path or store_path()
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        return {k: _record_of(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def save_record(record: CalibrationRecord, *, path: Path | None = None) -> Path:
    """Add or replace ``record`` in the store (atomic rename); returns the store path."""
    p = path or store_path()
    records = load_records(path=p)
    records[record.gpu.key] = record
    doc = {k: dict(asdict(r), initialised=list(r.initialised)) for k, r in sorted(records.items())}
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        raise StorageError(f"cannot write the calibration store {p} ({e.strerror})") from None
    return p


def now_text() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def torch_version() -> str:
    """The installed torch's version string without importing it ("none" when absent)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def local_gpus() -> list[GpuIdentity]:
    """NVIDIA GPUs visible here per ``nvidia-smi`` (honours CUDA_VISIBLE_DEVICES only by index order);
    empty without nvidia-smi or when it fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        rows = [r for w in wanted for r in rows if r and r[0] == w]
    tv = torch_version()
    return [GpuIdentity(name=r[1], driver=r[2], torch=tv) for r in rows if len(r) >= 3]


@dataclass(frozen=True)
class OverheadChoice:
    """The overhead per GPU to charge (None: the format's default) and where it comes from."""

    per_device: tuple[int, ...] | None
    note: str


def overhead_line(*, overhead: tuple[int, ...] | None, note: str, formats: Iterable[str]) -> str:
    """The line commands print: the figure charged per GPU and where it comes from. With no figure
    (``overhead`` None) it names the default of each format in ``formats``."""
    if overhead is not None:
        return note
    from optimizer.formats import rules_for

    figures = ", ".join(f"{fmt} {rules_for(fmt).DEFAULT_OVERHEAD_BYTES / _MIB:.0f} MiB" for fmt in dict.fromkeys(formats))
    return f"overhead per GPU: {figures or 'the format default'}, {note}"


def choose_overhead(*, explicit: tuple[int, ...] | None, gpus: list[GpuIdentity] | None = None,
                    path: Path | None = None) -> OverheadChoice:
    """The overhead figure a command uses (see the module docstring) and where it comes from
    (``note``; :func:`overhead_line` makes the printed line). ``gpus`` defaults to :func:`local_gpus`."""
    if explicit is not None:
        return OverheadChoice(explicit, "overhead per GPU: " + ", ".join(f"{b / _MIB:.0f} MiB" for b in explicit)
                              + " (--overhead)")
    default_note = "the default for uncalibrated GPUs (docs/calibration.md)"
    found = local_gpus() if gpus is None else gpus
    if not found:
        return OverheadChoice(None, default_note + "; no NVIDIA GPU visible here to look up")
    records = load_records(path=path)
    missing = [g for g in found if g.key not in records]
    if missing:
        return OverheadChoice(None, default_note + f"; {missing[0].key} is not calibrated: run `exl2opt calibrate`")
    best = max((records[g.key] for g in found), key=lambda r: r.overhead_bytes)
    return OverheadChoice((best.overhead_bytes,),
                          f"overhead per GPU: {best.overhead_bytes / _MIB:.0f} MiB, calibrated on {best.gpu.key} "
                          f"({best.measured_at})")

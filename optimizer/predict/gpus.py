"""Known GPUs (``data/gpus.csv``), forgiving name matching, and local GPU detection for ``--gpu auto``."""

from __future__ import annotations

import csv
import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from optimizer.errors import BadOptionError

_DATA = Path(__file__).with_name("data") / "gpus.csv"
_NOISE = re.compile(r"\b(nvidia|geforce|tesla|graphics|gpu|generation)\b")


@dataclass(frozen=True)
class Gpu:
    """One GPU model. ``bandwidth_gb_s`` in GB/s (10^9 bytes/s), ``fp16_tflops`` the dense FP16 tensor rate
    (FP16 accumulate) or None when not verified, ``host`` = ``desktop`` or ``server`` (per-layer cost prior)."""

    name: str
    memory_gib: float
    bandwidth_gb_s: float
    fp16_tflops: float | None
    host: str
    source_url: str
    aliases: tuple[str, ...] = ()

    @property
    def bandwidth(self) -> float:
        """Memory bandwidth in bytes/s."""
        return self.bandwidth_gb_s * 1e9


def compact(name: str) -> str:
    """Lower case, vendor words dropped, letters and digits only: ``NVIDIA GeForce RTX 4090`` -> ``rtx4090``."""
    return re.sub(r"[^a-z0-9]", "", _NOISE.sub(" ", name.lower()))


@functools.lru_cache(maxsize=1)
def known_gpus() -> tuple[Gpu, ...]:
    """Every GPU in the shipped table, in table order."""
    out = []
    with _DATA.open(newline="") as f:
        for r in csv.DictReader(f):
            out.append(Gpu(
                name=r["name"], memory_gib=float(r["memory_gib"]), bandwidth_gb_s=float(r["bandwidth_gb_s"]),
                fp16_tflops=float(r["fp16_tflops"]) if r["fp16_tflops"] else None, host=r["host"],
                source_url=r["source_url"], aliases=tuple(a for a in r["aliases"].split(";") if a),
            ))
    return tuple(out)


def find_gpu(name: str) -> Gpu:
    """The known GPU a user-typed or driver-reported name means.

    Matching ignores case, spaces, dashes and the words NVIDIA/GeForce/Tesla: ``4090``, ``rtx-4090`` and
    ``NVIDIA GeForce RTX 4090`` all match. An exact name or alias wins; otherwise the one GPU whose name ends
    with the query, or contains it; otherwise the most specific alias contained in the query (driver names
    such as ``NVIDIA A100-SXM4-80GB``). Several equally good matches raise :class:`~optimizer.errors.BadOptionError` naming them.
    """
    q = compact(name)
    if not q:
        raise BadOptionError(f"empty GPU name {name!r} (see --gpu list)")
    gpus = known_gpus()
    keys = {g: (compact(g.name), *g.aliases) for g in gpus}
    exact = [g for g, ks in keys.items() if q in ks]
    if len(exact) == 1:
        return exact[0]
    for pick in (lambda k: k.endswith(q), lambda k: q in k):
        hits = [g for g, ks in keys.items() if any(pick(k) for k in ks)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BadOptionError(f"GPU {name!r} is ambiguous: {', '.join(g.name for g in hits)} (be more specific)")
    inside = [(max(len(k) for k in ks if k in q), g) for g, ks in keys.items() if any(k in q for k in ks)]
    if inside:
        best = max(n for n, _ in inside)
        top = [g for n, g in inside if n == best]
        if len(top) == 1:
            return top[0]
        raise BadOptionError(f"GPU {name!r} is ambiguous: {', '.join(g.name for g in top)} (be more specific)")
    raise BadOptionError(f"unknown GPU {name!r} (`exl2opt fit --gpu list` shows the known ones)")


def detect_gpu_names(*, timeout_s: float = 10.0) -> list[str]:
    """Names of the local GPUs: ``nvidia-smi`` when on PATH, else torch when importable; [] when neither sees one."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=timeout_s, check=False)
            names = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
            if res.returncode == 0 and names:
                return names
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch
    except Exception:
        return []
    try:
        if torch.cuda.is_available():
            return [str(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    except Exception:
        return []
    return []

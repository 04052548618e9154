"""The search spec and its one stored schema.

A :class:`SearchSpec` is everything that defines a study's search space and measurement
protocols. It is stored in the study twice, each for one purpose: the *fingerprint* (what must not
change when a study is resumed) and the *record* (JSON that rebuilds the spec on another machine,
so ``exl2opt worker --study S`` joins without ``--model``). Variants are stored as metadata only:
no Hub token is ever part of a :class:`~optimizer.variant.Location`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optimizer.backends.base import EvalProtocol, SpeedProtocol
from optimizer.errors import StudyError
from optimizer.formats import RuntimeOptions
from optimizer.space import Budget
from optimizer.variant import Location, TensorInfo, Variant
from optimizer.vram import Split

#: Study user attribute holding :func:`spec_record`.
SPEC_ATTR = "spec"
#: Study user attribute holding :meth:`SearchSpec.fingerprint`.
FINGERPRINT_ATTR = "fingerprint"


@dataclass(frozen=True)
class SearchSpec:
    """Everything that defines the search space and the measurement protocols."""

    variants: tuple[Variant, ...]
    budget: Budget
    split: Split
    contexts: tuple[int, ...] | None = None
    caches: tuple[str, ...] | None = None
    min_ctx: int = 0
    runtime: RuntimeOptions = RuntimeOptions()
    eval_protocol: EvalProtocol = EvalProtocol()
    speed_protocol: SpeedProtocol = SpeedProtocol()

    def fingerprint(self) -> str:
        """What must not change when a study is resumed."""
        margin = {"margin": list(self.budget.margin)} if self.budget.margin is not None else {}
        return json.dumps({**margin,
            "variants": sorted(v.key for v in self.variants),
            "budget": [list(self.budget.per_device), list(self.budget.overhead or ())],
            "split": self.split.label, "contexts": list(self.contexts or ()), "caches": list(self.caches or ()),
            "min_ctx": self.min_ctx, "runtime": asdict(self.runtime),
            "eval": self.eval_protocol.key, "speed": self.speed_protocol.key,
        }, sort_keys=True)


_FP_NAMES = {"variants": "models (a moved or renamed model directory counts)", "eval": "eval protocol/data",
             "speed": "speed protocol", "runtime": "runtime options"}


def fingerprint_diff(*, old: str, new: str) -> str:
    """The settings that differ between two fingerprints, by their user-facing name
    (``models`` for a moved or renamed model directory too)."""
    try:
        a, b = json.loads(old), json.loads(new)
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    except (TypeError, ValueError, AttributeError):
        return "unknown"
    return ", ".join(_FP_NAMES.get(k, k) for k in keys) or "unknown"


# ----- variants ------------------------------------------------------------------------------------


def variant_record(v: Variant) -> dict[str, Any]:
    """A JSON record that rebuilds ``v`` (metadata only; no token is ever part of a Location)."""
    return {
        "format": v.format, "label": v.label, "location": asdict(v.location), "bits": v.bits,
        "head_bits": v.head_bits, "config": dict(v.config),
        "tensors": [[t.name, t.dtype, list(t.shape), t.nbytes] for t in v.tensors],
    }


def variant_from_record(rec: dict[str, Any]) -> Variant:
    """The :class:`Variant` of a :func:`variant_record`."""
    loc = dict(rec["location"])
    loc["files"] = tuple(loc.get("files") or ())
    return Variant(
        format=rec["format"], label=rec["label"], location=Location(**loc), config=rec["config"],
        tensors=tuple(TensorInfo(name=n, dtype=d, shape=tuple(s), nbytes=int(b)) for n, d, s, b in rec["tensors"]),
        bits=rec.get("bits"), head_bits=rec.get("head_bits"),
    )


def write_variants(*, variants: Sequence[Variant], path: Path) -> None:
    """Write ``{key: variant_record}`` to ``path`` atomically (the study's ``variants.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({v.key: variant_record(v) for v in variants}))
    os.replace(tmp, path)


def variant_summary(v: Variant) -> dict[str, Any]:
    """Small per-variant facts kept as a study user attribute (what reports need; sizes in bytes)."""
    return {"source": v.source, "format": v.format, "label": v.label, "bits": v.bits, "head_bits": v.head_bits,
            "download": v.location.download_command(), "weight_bytes": v.total_bytes}


# ----- the spec record -------------------------------------------------------------------------------


def spec_record(spec: SearchSpec) -> dict[str, Any]:
    """JSON that rebuilds ``spec`` on another machine (variants as metadata only; no token)."""
    return {
        "variants": [variant_record(v) for v in spec.variants],
        "budget": {"per_device": list(spec.budget.per_device),
                   "overhead": list(spec.budget.overhead) if spec.budget.overhead is not None else None,
                   "margin": list(spec.budget.margin) if spec.budget.margin is not None else None},
        "split": asdict(spec.split),
        "contexts": list(spec.contexts) if spec.contexts is not None else None,
        "caches": list(spec.caches) if spec.caches is not None else None,
        "min_ctx": spec.min_ctx,
        "runtime": asdict(spec.runtime),
        "eval_protocol": asdict(spec.eval_protocol),
        "speed_protocol": asdict(spec.speed_protocol),
    }


def spec_from_record(rec: Any, *, study_name: str = "") -> SearchSpec:
    """The :class:`SearchSpec` of a :func:`spec_record`.

    Raises:
        StudyError: the record is damaged (edited by hand, cut short, or written by another tool).
    """
    try:
        if not isinstance(rec, dict):
            raise TypeError(f"a {type(rec).__name__} where a JSON object belongs")
        sp = dict(rec["split"])
        for k in ("gpu_split", "reserve_bytes"):
            sp[k] = tuple(sp.get(k) or ())
        ov = rec["budget"].get("overhead")
        mg = rec["budget"].get("margin")
        return SearchSpec(
            variants=tuple(variant_from_record(v) for v in rec["variants"]),
            budget=Budget(per_device=tuple(rec["budget"]["per_device"]),
                          overhead=tuple(ov) if ov is not None else None,
                          margin=tuple(mg) if mg is not None else None),
            split=Split(**sp),
            contexts=tuple(rec["contexts"]) if rec.get("contexts") is not None else None,
            caches=tuple(rec["caches"]) if rec.get("caches") is not None else None,
            min_ctx=int(rec.get("min_ctx", 0)),
            runtime=RuntimeOptions(**rec["runtime"]),
            eval_protocol=EvalProtocol(**rec["eval_protocol"]),
            speed_protocol=SpeedProtocol(**rec["speed_protocol"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        name = f"study {study_name!r}" if study_name else "the study"
        raise StudyError(f"the search settings stored in {name} are damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'bad record'}); give the worker the "
                         "--model/--vram/... options again, or start a new --study") from None

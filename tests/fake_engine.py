"""A deterministic fake measurement backend for tests (never shipped in the package).

:class:`FakeEngine` follows :class:`optimizer.backends.base.Engine`: it "loads" a model when the
variant or split changes and otherwise only rebuilds the cache, and returns perplexity and speed
from a known landscape (:func:`fake_ppl`, :func:`fake_speed`), so tests can compute the true Pareto
front by brute force. Every call is appended to ``FakeEngine.calls`` and, when the environment
variable ``FAKE_ENGINE_LOG`` names a file, to that file as JSON lines (so a test can see calls made
by a subprocess). ``FAKE_ENGINE_DELAY`` (seconds) slows each measurement; ``FAKE_ENGINE_OOM`` is a
comma-separated list of ``cache@ctx`` that raise EngineOOMError; ``FAKE_ENGINE_ERROR`` makes every
load fail with that message (an EngineError; an EngineTransientError when ``FAKE_ENGINE_TRANSIENT=1``).
Under autosplit it reloads for every spec unless the spec shares the loaded placement (``place_around``),
as the exllamav2 backend does.

The measured memory is the prediction plus ``extra_bytes`` per device (``FAKE_ENGINE_EXTRA_BYTES``;
may be negative), so a test can make a configuration that was predicted to fit measure over budget.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from optimizer.backends.base import (
    DeviceMemory,
    EvalProtocol,
    LoadSpec,
    PrepareInfo,
    SpeedProtocol,
    SpeedResult,
)
from optimizer.errors import EngineError, EngineOOMError, EngineTransientError
from optimizer.formats import RuntimeOptions
from optimizer.space import Budget, Configuration, evaluate
from optimizer.variant import Variant

CACHE_PPL = {"fp16": 0.0, "fp8": 0.08, "q8": 0.01, "q6": 0.03, "q4": 0.12}
CACHE_SPEED = {"fp16": 1.0, "fp8": 0.97, "q8": 0.9, "q6": 0.93, "q4": 0.95}


def fake_ppl(variant: Variant, cache: str) -> float:
    """Perplexity of the landscape: lower with more bits, higher with lossy caches."""
    bits = variant.bits or 4.0
    return round(6.0 + 8.0 / bits + CACHE_PPL.get(cache, 0.05), 6)


def fake_speed(variant: Variant, cache: str, split_label: str, fill: int) -> tuple[float, float]:
    """(prompt tok/s, gen tok/s): faster with fewer bits, slower with a fuller cache and more GPUs."""
    bits = variant.bits or 4.0
    n_gpu = 1 if split_label == "1gpu" else 2
    gen = 400.0 / bits * CACHE_SPEED.get(cache, 0.9) / (1.0 + fill / 65536) / (1.0 + 0.1 * (n_gpu - 1))
    return round(gen * 25.0, 6), round(gen, 6)


@dataclass
class FakeEngine:
    """Deterministic engine with call counters."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    loads: int = 0
    model_key: tuple[str, str] | None = None
    placed: tuple[int, str] | None = None  #: autosplit: (tokens, cache) the loaded layers were placed around
    spec: LoadSpec | None = None
    closed: bool = False
    extra_bytes: int = 0  #: added to each device's measured peak (plus FAKE_ENGINE_EXTRA_BYTES)
    #: ``cache@ctx`` that run out of memory when built in an autosplit placement made around another cache
    oom_in_shared: set[str] = field(default_factory=set)

    def _log(self, what: str, key: str) -> None:
        self.calls.append((what, key))
        path = os.environ.get("FAKE_ENGINE_LOG")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps([what, key]) + "\n")

    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        error = os.environ.get("FAKE_ENGINE_ERROR", "")
        if error:
            self._log("error", f"{spec.variant.key}|{spec.cache}|{spec.max_seq_len}")
            raise (EngineTransientError if os.environ.get("FAKE_ENGINE_TRANSIENT") == "1" else EngineError)(error)
        oom = {s for s in os.environ.get("FAKE_ENGINE_OOM", "").split(",") if s}
        if f"{spec.cache}@{spec.max_seq_len}" in oom:
            self.unload()
            self._log("oom", f"{spec.variant.key}|{spec.cache}|{spec.max_seq_len}")
            raise EngineOOMError("CUDA out of memory (fake)")
        auto = spec.split.mode == "auto"
        if auto and f"{spec.cache}@{spec.max_seq_len}" in self.oom_in_shared and (
                spec.placement != (spec.max_seq_len, spec.cache)):
            self.unload()
            self._log("oom", f"{spec.variant.key}|{spec.cache}|{spec.max_seq_len}|shared")
            raise EngineOOMError("CUDA out of memory (fake, in a shared placement)")
        keep = spec.model_key == self.model_key and (not auto or (
            spec.place_around is not None and spec.placement == self.placed and spec.max_seq_len <= spec.placement[0]))
        if not keep:  # autosplit places the layers around a cache: reloaded unless the placement is shared
            self.loads += 1
            self.model_key = spec.model_key
            self.placed = spec.placement if auto else None
            self._log("load", spec.variant.key)
        self._log("cache", f"{spec.variant.key}|{spec.cache}|{spec.max_seq_len}")
        self.spec = spec
        own = not auto or (not keep and spec.placement == (spec.max_seq_len, spec.cache))
        return PrepareInfo(model_loaded=not keep, placed_around=None if own else self.placed)

    def tokenize(self, text: str) -> Sequence[int]:
        return [ord(c) % 251 for c in text]

    def perplexity(self, *, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        assert self.spec is not None
        self._log("ppl", f"{self.spec.variant.key}|{self.spec.cache}")
        time.sleep(float(os.environ.get("FAKE_ENGINE_DELAY", "0")))
        return fake_ppl(self.spec.variant, self.spec.cache)

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        assert self.spec is not None
        s = self.spec
        self._log("speed", f"{s.variant.key}|{s.cache}|{s.split.label}|{protocol.context_fill}")
        prompt, gen = fake_speed(s.variant, s.cache, s.split.label, protocol.context_fill)
        return SpeedResult(prompt_tok_s=prompt, gen_tok_s=gen, context_fill=protocol.context_fill)

    def memory(self) -> tuple[DeviceMemory, ...]:
        assert self.spec is not None
        s = self.spec
        cfg = Configuration(variant=s.variant, max_seq_len=s.max_seq_len, cache=s.cache, split=s.split)
        rt = RuntimeOptions(batch_size=s.batch_size, chunk_len=s.chunk_len, flash_attn=s.flash_attn)
        v = evaluate(config=cfg, budget=Budget(per_device=(1 << 50,)), runtime=rt)
        extra = self.extra_bytes + int(os.environ.get("FAKE_ENGINE_EXTRA_BYTES", "0"))
        return tuple(DeviceMemory(index=d.index, peak_allocated=d.total - d.overhead + extra, used=d.total + extra)
                     for d in v.devices if d.n_modules)

    def unload(self) -> None:
        self.model_key = self.placed = None
        self.spec = None

    def close(self) -> None:
        self.unload()
        self.closed = True


@dataclass
class FakeBackend:
    """Backend handing out one shared :class:`FakeEngine` (so tests can inspect it)."""

    engine: FakeEngine = field(default_factory=FakeEngine)
    name: str = "fake"
    formats: tuple[str, ...] = ("exl2", "exl3", "gguf")
    opened: int = 0

    def check_available(self) -> None:
        return None

    def open(self) -> FakeEngine:
        self.opened += 1
        return self.engine


_SHARED = FakeBackend()


def fake_backend_factory(variant: Variant) -> FakeBackend:
    """Factory for ``exl2opt search --backend-factory fake_engine:fake_backend_factory``."""
    return _SHARED

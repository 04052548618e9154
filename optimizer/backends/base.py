"""The measurement backend interface: small, stable, format-agnostic. No heavy imports here.

A *backend* names an engine family (``exllamav2``, ``llamacpp``) and the variant formats it can run.
It hands out one *engine*: a stateful object that holds at most one loaded model at a time.

The study drives an engine like this (see ``optimizer.study``)::

    engine = backend.open()                 # raises BackendUnavailableError (one clear line)
    for config in configs_in_variant_major_order:
        info = engine.prepare(LoadSpec(...))   # loads the model only when variant/split (autosplit: the
                                                # placement) changed; otherwise rebuilds only the cache
        ppl = engine.perplexity(tokens=..., protocol=...)   # once per (variant, cache, protocol)
        spd = engine.speed(protocol=...)                    # once per (variant, cache, split, fill)
        mem = engine.memory()                                # every trial: peak bytes per device
    engine.close()

Errors an engine raises: :class:`~optimizer.errors.EngineOOMError` (the trial fails with reason
``oom``; the engine must have freed the GPU before raising and stays usable),
:class:`~optimizer.errors.EngineError` (any other failure of one configuration; same contract), and
:class:`~optimizer.errors.BackendUnavailableError` (the whole backend cannot run here).

Units: bytes for memory, tokens for lengths, seconds for time, tokens/second for speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from optimizer.variant import Variant
from optimizer.vram import Split


@dataclass(frozen=True)
class LoadSpec:
    """What to have loaded: a variant with a split, and a cache of ``max_seq_len`` tokens in mode ``cache``.

    ``chunk_len`` is the prompt chunk (ExLlamaV2 ``max_input_len``, llama.cpp ``n_batch``);
    ``batch_size`` the cache batch. ``flash_attn`` may be ignored by engines that decide it themselves.

    ``place_around`` (autosplit only): ``(max_seq_len, cache)`` of the configuration whose placement to
    load. The engine places the layers around *that* cache, as a fresh load of it would, and builds this
    spec's own cache in that placement; specs with the same ``place_around`` then share one load. The
    caller has checked with the VRAM model that this spec's cache fits in that placement
    (:mod:`optimizer.study.placement`); ``max_seq_len`` is at most the one placed around (the RoPE tables
    are sized at load). None: a fresh autosplit load around this spec's own cache. An engine that cannot
    build a cache in an existing placement ignores it and loads this spec's own placement.
    """

    variant: Variant
    split: Split
    max_seq_len: int
    cache: str
    chunk_len: int = 2048
    batch_size: int = 1
    flash_attn: bool = False
    n_gpu_layers: int | None = None  #: llama.cpp layers offloaded (None = all); ignored by exllamav2
    place_around: tuple[int, str] | None = None  #: autosplit: (tokens, cache mode) to place the layers around

    @property
    def model_key(self) -> tuple[str, str]:
        """Identity of the loaded *model* (the cache is not part of it)."""
        return (self.variant.key, self.split.label)

    @property
    def placement(self) -> tuple[int, str]:
        """``(max_seq_len, cache)`` an autosplit load places the layers around: ``place_around`` or its own."""
        return self.place_around if self.place_around is not None else (self.max_seq_len, self.cache)


@dataclass(frozen=True)
class PrepareInfo:
    """What :meth:`Engine.prepare` had to do. ``model_loaded`` False means only the cache was rebuilt.

    ``placed_around``: under autosplit, the ``(max_seq_len, cache)`` the loaded placement was made around
    when the spec's cache was built in a placement that a fresh load of this spec did not make (another
    configuration's cache, or this one's placement kept from an earlier load). Perplexity and speed do
    not depend on it (same GPUs, same layers); the measured memory does, so it is not this
    configuration's own load. None: the layers sit where a fresh load of this spec put them.
    """

    model_loaded: bool
    load_seconds: float = 0.0
    placed_around: tuple[int, str] | None = None


@dataclass(frozen=True)
class EvalProtocol:
    """How perplexity is measured; part of the perplexity memo key.

    Each window is ``window`` tokens taken back to back from the tokenized evaluation text (a BOS
    token is prepended when ``add_bos``, replacing the window's first text token so the window
    stays ``window`` long). The first ``prefill`` tokens are written into the cache without
    scoring; the rest are fed in chunks of ``score_chunk`` tokens through the cache and every
    next-token prediction of those chunks is scored. Scored tokens therefore attend to earlier
    tokens stored in the (possibly quantized) cache, so the cache mode shows up in perplexity.
    Perplexity = exp(mean negative log-likelihood over all scored tokens of ``n_windows`` windows).
    """

    dataset: str = "wikitext-2-raw-v1:test"
    window: int = 2048
    n_windows: int = 20
    prefill: int = 1024
    score_chunk: int = 256
    add_bos: bool = True

    def fitted(self, context: int) -> EvalProtocol:
        """This protocol as it runs in a cache of ``context`` tokens: a longer window shrinks to the
        context and its prefill to half of it (the rule every engine applies). Perplexity is memoized by
        the fitted protocol's key, so a result measured with a shrunken window is never reused for a
        context that allows the full one."""
        if self.window <= context:
            return self
        return replace(self, window=context, prefill=min(self.prefill, context // 2))

    @property
    def key(self) -> str:
        return (f"{self.dataset}|w={self.window}|n={self.n_windows}|pre={self.prefill}"
                f"|chunk={self.score_chunk}|bos={int(self.add_bos)}")


@dataclass(frozen=True)
class SpeedProtocol:
    """How speed is measured; part of the speed memo key.

    The cache is first filled to ``context_fill`` tokens (clamped to the allocated context minus
    ``gen_tokens``); prompt speed is that prefill (``context_fill`` tokens / seconds, after
    ``warmup`` untimed passes); generation speed is ``gen_tokens`` single-token forwards
    (greedy, batch 1) on top of the filled cache. Timings are bracketed by device synchronization.
    """

    context_fill: int = 2048
    gen_tokens: int = 128
    warmup: int = 1
    repeats: int = 3  #: timed measurements (prefill + generation each); the result is their median

    @property
    def key(self) -> str:
        return f"fill={self.context_fill}|gen={self.gen_tokens}|warm={self.warmup}|rep={self.repeats}"


@dataclass(frozen=True)
class SpeedResult:
    """Measured throughput in tokens/second, at ``context_fill`` tokens actually in the cache.

    With several timed runs, ``prompt_tok_s``/``gen_tok_s`` are their medians and the ``*_runs``
    tuples hold every run (tokens/second, in run order); empty when an engine timed once."""

    prompt_tok_s: float
    gen_tok_s: float
    context_fill: int
    prompt_tok_s_runs: tuple[float, ...] = ()
    gen_tok_s_runs: tuple[float, ...] = ()

    @classmethod
    def of_runs(cls, *, prompt_s: Sequence[float], gen_s: Sequence[float], context_fill: int, gen_tokens: int) -> SpeedResult:
        """The result of timed runs: ``prompt_s``/``gen_s`` are seconds per run for ``context_fill``
        prompt tokens and ``gen_tokens`` generated ones; speeds are medians over the runs."""
        import statistics

        p = tuple(context_fill / max(t, 1e-9) for t in prompt_s)
        g = tuple(gen_tokens / max(t, 1e-9) for t in gen_s)
        return cls(prompt_tok_s=statistics.median(p), gen_tok_s=statistics.median(g), context_fill=context_fill,
                   prompt_tok_s_runs=p, gen_tok_s_runs=g)


@dataclass(frozen=True)
class DeviceMemory:
    """Measured memory of one device in bytes.

    ``peak_allocated``: the framework's peak allocation since the last :meth:`Engine.prepare`
    (``torch.cuda.max_memory_allocated``). ``used``: device-wide used memory (total - free from
    ``cudaMemGetInfo``), which includes the CUDA context and other processes. ``reserved``: what
    the framework's caching allocator holds from the device (``torch.cuda.memory_reserved``; None
    when the engine has no such figure).
    """

    index: int
    peak_allocated: int
    used: int
    reserved: int | None = None

    @property
    def overhead(self) -> int | None:
        """Device memory used beyond the framework's reserved pool (bytes): CUDA context, cuBLAS
        workspace, other processes; None when the engine has no reserved figure."""
        return None if self.reserved is None else max(self.used - self.reserved, 0)

    def record(self) -> dict[str, Any]:
        """The figures a trial stores (bytes)."""
        return {"index": self.index, "peak_allocated": self.peak_allocated, "used": self.used,
                "reserved": self.reserved, "overhead": self.overhead}


class Engine(Protocol):
    """A stateful measurement engine holding at most one loaded model."""

    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        """Make ``spec`` the loaded state, reusing the model when only the cache changed."""
        ...

    def tokenize(self, text: str) -> Sequence[int]:
        """Token ids of ``text`` with the loaded model's tokenizer (no BOS)."""
        ...

    def perplexity(self, *, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        """Perplexity of the loaded model and cache under ``protocol`` (see :class:`EvalProtocol`)."""
        ...

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        """Prompt and generation throughput of the loaded model and cache."""
        ...

    def memory(self) -> tuple[DeviceMemory, ...]:
        """Measured memory per device used by the current load (bytes)."""
        ...

    def unload(self) -> None:
        """Free the model and cache (the engine stays usable)."""
        ...

    def close(self) -> None:
        """Free everything; the engine is not used again."""
        ...


class Backend(Protocol):
    """A factory of engines for some variant formats.

    ``name``: ``"exllamav2"``, ``"llamacpp"``...; ``formats``: the ``Variant.format`` values it runs.
    """

    name: str
    formats: tuple[str, ...]

    def check_available(self) -> None:
        """Raise BackendUnavailableError (one line: what is missing, how to get it) if it cannot run."""
        ...

    def open(self) -> Engine:
        """A fresh engine (calls :meth:`check_available` first)."""
        ...

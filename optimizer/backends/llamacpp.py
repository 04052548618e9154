"""llama-cpp-python backend: GGUF variants measured through llama.cpp's low-level C API.

The engine loads a model once per (variant, split) and rebuilds only the context when the context
length or KV types change, mirroring what ``Llama(...)`` would allocate: ``n_batch =
min(n_ctx, chunk_len)``, ``n_ubatch = min(n_batch, 512)``, ``n_outputs_max = n_batch``, one sequence,
``swa_full`` at the C default. Flash attention is on when asked or when V is quantized (llama.cpp
refuses a quantized V cache otherwise). Threads are set explicitly (``n_threads``, default 1 for
stable figures on a shared CPU).

Memory: llama.cpp prints every buffer it allocates; a process-wide log callback keeps those lines
(:func:`capture_log`), :func:`parse_buffers` reads them and :func:`dry_run` reproduces a load with
``no_alloc`` (nothing allocated, exact compute-buffer and KV sizes) — the checks in
``tests/test_gguf_llamacpp.py`` compare ``optimizer.formats.gguf`` against those numbers.

``llama_cpp`` and numpy are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from optimizer.backends.base import (
    DeviceMemory,
    EvalProtocol,
    LoadSpec,
    PrepareInfo,
    SpeedProtocol,
    SpeedResult,
)
from optimizer.backends.progress import window_done
from optimizer.backends.timing import timed_runs
from optimizer.errors import BackendUnavailableError, EngineError, EngineOOMError
from optimizer.formats import RuntimeOptions
from optimizer.formats.gguf import GGML_TYPE_IDS, LlamaSettings
from optimizer.sources.download import local_path
from optimizer.vram import Split

MIB = 2**20
INSTALL_HINT = ("llama-cpp-python is not installed: pip install llama-cpp-python "
                "(builds llama.cpp from source, ~10-15 min on 2 cores)")

# ----- log capture ------------------------------------------------------------------------------

_LOG: list[str] = []
_CALLBACK: Any = None  # keeps the ctypes callback alive


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return llama_cpp


def install_log_capture() -> None:
    """Route every llama.cpp log line (INFO and DEBUG, any ``verbose``) into a process-wide list.

    llama.cpp's logger is process-global and not thread-safe; this is set once per process and
    replaces llama-cpp-python's own stderr printer (nothing is printed any more).
    """
    global _CALLBACK
    if _CALLBACK is not None:
        return
    llama_cpp = _llama()

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator,misc]
    def _cb(level: int, text: bytes, user_data: Any) -> None:
        if len(_LOG) > 200_000:
            del _LOG[:100_000]
        _LOG.append(text.decode("utf-8", "replace"))

    _CALLBACK = _cb
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))


@contextlib.contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect the llama.cpp log lines emitted inside the block (the list fills on exit)."""
    install_log_capture()
    start = len(_LOG)
    out: list[str] = []
    try:
        yield out
    finally:
        out.extend(_LOG[start:])


_BUF_RE = re.compile(r"(?P<dev>\S+)\s+(?P<kind>model|KV|compute|output)\s+buffer size\s*=\s*(?P<mib>[\d.]+) MiB", re.M)
_KV_SIZE_RE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB")
_FILE_SIZE_RE = re.compile(r"file size\s*=\s*([\d.]+) MiB")


@dataclass(frozen=True)
class LlamaBuffers:
    """Buffer sizes llama.cpp logged, in MiB as printed (two decimals), keyed by buffer name."""

    model: dict[str, float] = field(default_factory=dict)
    kv: dict[str, float] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)
    output: dict[str, float] = field(default_factory=dict)
    kv_size: float | None = None
    file_size: float | None = None

    @property
    def total_bytes(self) -> int:
        """Model + KV + compute + output buffers (bytes, from the 2-decimal MiB values)."""
        parts = (self.model, self.kv, self.compute, self.output)
        return int(sum(sum(d.values()) for d in parts) * MIB)


def parse_buffers(lines: Sequence[str]) -> LlamaBuffers:
    """Read the ``... buffer size = X MiB`` and ``llama_kv_cache: size`` lines (several KV caches add up)."""
    text = "".join(lines)
    kinds: dict[str, dict[str, float]] = {"model": {}, "KV": {}, "compute": {}, "output": {}}
    for m in _BUF_RE.finditer(text):
        d = kinds[m.group("kind")]
        d[m.group("dev")] = d.get(m.group("dev"), 0.0) + float(m.group("mib"))
    kv_sizes = [float(x) for x in _KV_SIZE_RE.findall(text)]
    fs = _FILE_SIZE_RE.search(text)
    return LlamaBuffers(model=kinds["model"], kv=kinds["KV"], compute=kinds["compute"], output=kinds["output"],
                        kv_size=sum(kv_sizes) if kv_sizes else None, file_size=float(fs.group(1)) if fs else None)


# ----- low-level loading ------------------------------------------------------------------------


def _model_params(*, n_gpu_layers: int | None, dry: bool, split: Split | None = None) -> Any:
    """llama.cpp model parameters. ``split`` sets a LAYER split with the explicit ``tensor_split``
    proportions the memory model assumes (``gguf_rules.tensor_split_of``: single = ``[1]``, i.e.
    everything on GPU 0; auto = even; manual = the given proportions). The ctypes array is kept alive."""
    llama_cpp = _llama()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = -1 if n_gpu_layers is None else n_gpu_layers
    # no extra CPU buffer types (weight repacking, AMX): the memory rules assume none, and on a CPU with
    # AMX (Sapphire Rapids) this build's AMX buffers crash llama_decode (SIGSEGV, found 2026-11-29)
    mp.use_extra_bufts = False
    if split is not None:
        from optimizer.formats.gguf_rules import tensor_split_of

        props = tensor_split_of(split)
        n_max = int(llama_cpp.LLAMA_MAX_DEVICES)
        if len(props) > n_max:
            raise EngineError(f"llama.cpp supports at most {n_max} devices, the split names {len(props)}")
        arr = _KEEP_ALIVE.setdefault(props, (ctypes.c_float * n_max)(*props))
        mp.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
        mp.tensor_split = ctypes.cast(arr, ctypes.POINTER(ctypes.c_float))
    if dry:
        mp.no_alloc = True
        mp.load_mode = 0  # LLAMA_LOAD_MODE_NONE: no_alloc with mmap aborts the process
    return mp


def _context_params(s: LlamaSettings, *, n_threads: int) -> Any:
    llama_cpp = _llama()
    cp = llama_cpp.llama_context_default_params()
    n_batch = min(s.n_ctx, s.n_batch)  # llama-cpp-python clamps with the *requested* n_ctx
    cp.n_ctx = s.n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = min(n_batch, s.n_ubatch)
    cp.n_seq_max = s.n_seq
    cp.n_outputs_max = n_batch
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    cp.flash_attn_type = 1 if s.flash_attn else 0
    cp.type_k = GGML_TYPE_IDS[s.type_k.lower()]
    cp.type_v = GGML_TYPE_IDS[s.type_v.lower()]
    cp.swa_full = s.swa_full
    cp.no_perf = False
    return cp


def dry_run(path: str, s: LlamaSettings, *, n_threads: int = 1) -> tuple[LlamaBuffers, int]:
    """Load ``path`` and create a context with ``no_alloc`` (nothing allocated) and return what llama.cpp
    logged plus ``llama_model_size`` (bytes). Model and KV buffer lines read 0.00 MiB in this mode;
    the ``llama_kv_cache: size`` and compute-buffer lines are the real sizes."""
    llama_cpp = _llama()
    with capture_log() as lines:
        model = llama_cpp.llama_model_load_from_file(path.encode(), _model_params(n_gpu_layers=s.n_gpu_layers, dry=True))
        if not model:
            raise EngineError(f"{path}: llama.cpp could not load the model")
        try:
            size = int(llama_cpp.llama_model_size(model))
            ctx = llama_cpp.llama_init_from_model(model, _context_params(s, n_threads=n_threads))
            if not ctx:
                raise EngineError(f"{path}: llama.cpp could not create a context for {s}: {_last_error(lines)}")
            llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)
    return parse_buffers(lines), size


#: ctypes arrays handed to llama.cpp as ``tensor_split``, one per distinct split (kept for the process).
_KEEP_ALIVE: dict[tuple[float, ...], Any] = {}


def settings_for_spec(spec: LoadSpec, *, n_gpu_layers: int | None = None) -> LlamaSettings:
    """The llama.cpp settings of a load spec (same rule as the memory model, ``gguf_rules.settings_for``)."""
    from optimizer.formats.gguf_rules import settings_for

    rt = RuntimeOptions(batch_size=spec.batch_size, chunk_len=spec.chunk_len, flash_attn=spec.flash_attn,
                        n_gpu_layers=n_gpu_layers)
    return settings_for(max_seq_len=spec.max_seq_len, cache=spec.cache, runtime=rt)


# ----- engine -----------------------------------------------------------------------------------


class LlamaCppEngine:
    """One loaded GGUF model and one context; see ``optimizer.backends.base.Engine``."""

    def __init__(self, *, n_threads: int = 1, n_gpu_layers: int | None = None) -> None:
        self._llama = _llama()
        install_log_capture()
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._model_key: tuple[str, ...] | None = None
        self._ctx_settings: LlamaSettings | None = None
        self._model_buffers = LlamaBuffers()
        self._ctx_buffers = LlamaBuffers()
        self._model_size = 0
        self.log: list[str] = []

    # -- loading
    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        lc = self._llama
        n_gpu = spec.n_gpu_layers if spec.n_gpu_layers is not None else self.n_gpu_layers
        s = settings_for_spec(spec, n_gpu_layers=n_gpu)
        t0 = time.perf_counter()
        loaded = False
        model_key = (*spec.model_key, str(n_gpu))
        if model_key != self._model_key:
            self.unload()
            if spec.variant.format != "gguf":
                raise EngineError(f"{spec.variant.source}: the llamacpp backend runs GGUF variants only")
            path = local_path(spec.variant)
            with capture_log() as lines:
                model = lc.llama_model_load_from_file(
                    path.encode(), _model_params(n_gpu_layers=s.n_gpu_layers, dry=False, split=spec.split))
            self.log = list(lines)
            if not model:
                raise EngineOOMError(f"{path}: llama.cpp could not load the model") if _looks_oom(lines) else \
                    EngineError(f"{path}: llama.cpp could not load the model")
            self._model, self._model_key = model, model_key
            self._vocab = lc.llama_model_get_vocab(model)
            self._model_buffers = parse_buffers(lines)
            self._model_size = int(lc.llama_model_size(model))
            loaded = True
        if loaded or s != self._ctx_settings:
            self._free_ctx()
            with capture_log() as lines:
                ctx = lc.llama_init_from_model(self._model, _context_params(s, n_threads=self.n_threads))
            self.log.extend(lines)
            if not ctx:
                msg = (f"{spec.variant.label}: llama.cpp could not create a context (n_ctx {s.n_ctx}, K {s.type_k}, "
                       f"V {s.type_v}): {_last_error(lines)}")
                raise EngineOOMError(msg) if _looks_oom(lines) else EngineError(msg)
            self._ctx, self._ctx_settings = ctx, s
            self._ctx_buffers = parse_buffers(lines)
        return PrepareInfo(model_loaded=loaded, load_seconds=time.perf_counter() - t0)

    def _need_ctx(self) -> Any:
        if self._ctx is None:
            raise EngineError("no model loaded (call prepare first)")
        return self._ctx

    def tokenize(self, text: str) -> Sequence[int]:
        lc = self._llama
        self._need_ctx()
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, raw, len(raw), buf, cap, False, False)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, raw, len(raw), buf, cap, False, False)
        return list(buf[:n])

    # -- decoding helpers
    def _decode(self, tokens: Sequence[int], start_pos: int, want_logits: bool) -> None:
        """Decode ``tokens`` at positions ``start_pos...`` in pieces of ``n_batch``; logits for all when asked
        (the caller reads them after each piece through :meth:`_decode_logits`)."""
        for _ in self._decode_pieces(tokens, start_pos, want_logits):
            pass

    def _decode_pieces(self, tokens: Sequence[int], start_pos: int, want_logits: bool) -> Iterator[int]:
        lc = self._llama
        ctx = self._need_ctx()
        n_batch = int(lc.llama_n_batch(ctx))
        batch = lc.llama_batch_init(n_batch, 0, 1)
        try:
            for off in range(0, len(tokens), n_batch):
                piece = tokens[off:off + n_batch]
                batch.n_tokens = len(piece)
                for k, tok in enumerate(piece):
                    batch.token[k] = int(tok)
                    batch.pos[k] = start_pos + off + k
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = 0
                    batch.logits[k] = want_logits
                rc = lc.llama_decode(ctx, batch)
                if rc != 0:
                    raise EngineError(f"llama_decode failed with code {rc}")
                lc.llama_synchronize(ctx)
                yield len(piece)
        finally:
            lc.llama_batch_free(batch)

    def _clear(self) -> None:
        lc = self._llama
        lc.llama_memory_clear(lc.llama_get_memory(self._need_ctx()), True)

    # -- measurements
    def perplexity(self, *, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        """Perplexity under ``protocol`` (windows back to back, BOS replaces the first token, prefill
        unscored, then ``score_chunk`` pieces whose every next-token prediction inside the window is
        scored), with the exllamav2 backend's clamps for short caches and short texts."""
        import numpy as np

        lc = self._llama
        ctx = self._need_ctx()
        n_ctx = int(lc.llama_n_ctx(ctx))
        # same clamps as the exllamav2 backend: a window longer than the cache shrinks to it (prefill
        # at most half of it), and a short text gives fewer windows
        window = min(protocol.window, self._ctx_settings.n_ctx if self._ctx_settings else n_ctx)
        prefill = min(protocol.prefill, window // 2) if protocol.window > window else protocol.prefill
        n_win = min(protocol.n_windows, len(tokens) // window)
        if n_win < 1:
            raise EngineError(f"evaluation text too short: {len(tokens)} tokens for one {window}-token window")
        n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        bos = int(lc.llama_vocab_bos(self._vocab))
        nll, count = 0.0, 0
        for w in range(n_win):
            win = [int(t) for t in tokens[w * window:(w + 1) * window]]
            if protocol.add_bos and bos >= 0:
                win[0] = bos
            self._clear()
            pre = min(prefill, len(win) - 1)
            if pre:
                self._decode(win[:pre], 0, False)
            pos = pre
            while pos < len(win) - 1:
                chunk = win[pos:min(pos + protocol.score_chunk, len(win))]
                off = 0
                for n in self._decode_pieces(chunk, pos, True):
                    ptr = lc.llama_get_logits(ctx)
                    logits = np.ctypeslib.as_array(ptr, shape=(n, n_vocab)).astype(np.float64)
                    p0 = pos + off  # position of the first row
                    rows = [i for i in range(n) if p0 + i + 1 < len(win)]
                    if rows:
                        lg = logits[rows]
                        mx = lg.max(axis=1, keepdims=True)
                        lse = (mx[:, 0] + np.log(np.exp(lg - mx).sum(axis=1)))
                        tgt = np.array([win[p0 + i + 1] for i in rows])
                        nll += float((lse - lg[np.arange(len(rows)), tgt]).sum())
                        count += len(rows)
                    off += n
                pos += len(chunk)
            window_done(w + 1, n_win)
        if count == 0:
            raise EngineError("no tokens were scored (window too short for the prefill)")
        return math.exp(nll / count)

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        """Prompt speed = prefill of ``context_fill`` random tokens; generation = ``gen_tokens`` single-token
        decodes after it (each followed by ``llama_synchronize``); wall clock, ``n_threads`` threads;
        ``repeats`` timed runs on a cleared cache, medians reported."""
        import random

        lc = self._llama
        ctx = self._need_ctx()
        n_ctx = int(lc.llama_n_ctx(ctx))
        fill = max(1, min(protocol.context_fill, n_ctx - protocol.gen_tokens))
        rng = random.Random(0)
        n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        prompt = [rng.randrange(n_vocab) for _ in range(fill)]
        for _ in range(protocol.warmup):
            self._clear()
            self._decode(prompt[:min(fill, 256)], 0, False)
        gen = [rng.randrange(n_vocab) for _ in range(protocol.gen_tokens)]

        def generate() -> None:
            for i, tok in enumerate(gen):
                self._decode([tok], fill + i, True)

        # every decode ends with llama_synchronize, so the runs need no device sync of their own
        return timed_runs(protocol=protocol, context_fill=fill, reset=self._clear,
                          prompt=lambda: self._decode(prompt, 0, False), generate=generate)

    def buffers(self) -> LlamaBuffers:
        """The buffers llama.cpp logged for the current model and context (MiB, by buffer name)."""
        m, c = self._model_buffers, self._ctx_buffers
        return LlamaBuffers(model=dict(m.model), kv=dict(c.kv), compute=dict(c.compute), output=dict(c.output),
                            kv_size=c.kv_size, file_size=m.file_size)

    def memory(self) -> tuple[DeviceMemory, ...]:
        """Measured memory of the current load, from the buffers llama.cpp logged (bytes).

        With GPU buffers (any buffer not named ``CPU*`` or ``*_Host``): one entry per GPU
        buffer name, ``peak_allocated`` = its model + KV + compute buffers. On a CPU-only build the
        whole model is the "device" (as in the budget rule of ``gguf_rules``): one entry with
        ``llama_model_size`` (the weights once, although ``CPU_Mapped`` and ``CPU_REPACK`` may
        overlap) + KV + compute buffers. ``used`` is the process's peak resident set size.
        """
        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        b = self.buffers()
        gpus = sorted({n for d in (b.model, b.kv, b.compute) for n in d
                       if not n.startswith("CPU") and not n.endswith("_Host")})  # CUDA_Host: pinned host memory
        if gpus:
            return tuple(DeviceMemory(index=i, peak_allocated=int((b.model.get(n, 0) + b.kv.get(n, 0) + b.compute.get(n, 0)) * MIB),
                                      used=rss) for i, n in enumerate(gpus))
        dev = self._model_size + int((sum(b.kv.values()) + sum(b.compute.values())) * MIB)
        return (DeviceMemory(index=0, peak_allocated=dev, used=rss),)

    def _free_ctx(self) -> None:
        if self._ctx is not None:
            self._llama.llama_free(self._ctx)
            self._ctx, self._ctx_settings = None, None
            self._ctx_buffers = LlamaBuffers()

    def unload(self) -> None:
        self._free_ctx()
        if self._model is not None:
            self._llama.llama_model_free(self._model)
            self._model, self._vocab, self._model_key = None, None, None
            self._model_buffers = LlamaBuffers()

    def close(self) -> None:
        self.unload()


def _last_error(lines: Sequence[str]) -> str:
    """The last non-empty log line (llama.cpp logs why a load failed just before returning NULL)."""
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "no log"


def _looks_oom(lines: Sequence[str]) -> bool:
    text = "".join(lines).lower()
    return "out of memory" in text or "failed to allocate" in text


class LlamaCppBackend:
    """Factory of :class:`LlamaCppEngine` (``Variant.format == "gguf"``)."""

    name = "llamacpp"
    formats: tuple[str, ...] = ("gguf",)

    def __init__(self, *, n_threads: int | None = None, n_gpu_layers: int | None = None) -> None:
        env = os.environ.get("EXL2OPT_LLAMA_THREADS")
        self.n_threads = n_threads if n_threads is not None else int(env) if env else 1
        self.n_gpu_layers = n_gpu_layers

    def check_available(self) -> None:
        _llama()

    def open(self) -> LlamaCppEngine:
        self.check_available()
        return LlamaCppEngine(n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers)


def backend() -> LlamaCppBackend:
    """The default backend instance (1 thread unless ``EXL2OPT_LLAMA_THREADS`` says otherwise)."""
    return LlamaCppBackend()


def make_backend() -> LlamaCppBackend:
    """Entry point of ``optimizer.backends.backend_for`` (same as :func:`backend`)."""
    return backend()

"""The ExLlamaV2 0.3.2 measurement backend (exl2 variants). torch and exllamav2 are imported lazily.

Loading (per :class:`~optimizer.backends.base.LoadSpec`):
    * ``config = ExLlamaV2Config(dir)``; before ``ExLlamaV2(config)``: ``config.max_seq_len``,
      ``max_input_len`` (= min(chunk, max_seq_len), as autosplit clamps it and the VRAM model
      assumes), ``max_attention_size`` (= that**2), ``max_batch_size``; ``no_flash_attn`` is only
      ever turned on (never overriding ``EXLLAMA_NO_FLASH_ATTN``), then
      ``config.arch_compat_overrides(quiet=True)`` (as exllamav2's ``model_init`` does) so archs
      that need eager attention or flash-attn softcap/SWA support get it; then, when neither
      flash-attn nor xformers will run, ``config.no_sdpa = True``: 0.3.2's SDPA branch passes no
      causal mask for prompts (``attn.py`` ``_attn_torch``), the matmul branch does (its fp16
      attention weights are bounded by ``max_attention_size``, which the VRAM model counts);
    * single GPU: ``model.load()``; manual split: ``model.load(gpu_split=[GiB...])``, then the cache;
    * autosplit: ``cache = Cls(model, max_seq_len=S, lazy=True)`` then
      ``model.load_autosplit(cache, reserve_vram=[bytes...])`` (it consumes its own generator);
      autosplit uses every visible GPU, so devices beyond the planned ``n_devices`` get an
      impossible reserve: spilling onto them is an out-of-memory, not a silent larger split;
    * cache class per mode: fp16 ``ExLlamaV2Cache``, fp8 ``ExLlamaV2Cache_8bit``, q8/q6/q4
      ``ExLlamaV2Cache_Q8/_Q6/_Q4``.
    The model is kept across trials of the same variant on a single GPU as long as the requested
    context is not larger than the one it was loaded with (the RoPE tables are sized by
    ``config.max_seq_len`` at load); then only the cache is rebuilt. The reused model keeps the
    sin/cos tables of its load context (2 x S_load x rot_dim x 2 bytes per RoPE base), which
    ``memory()`` then includes. A manual split is reused only at the same context, because
    ``set_device_map`` places layers using ``config.max_seq_len`` (sin/cos size and
    ``temp_kv_size``). Autosplit places weights around the cache it is given: the load places them
    around ``LoadSpec.placement`` (``place_around``, else the spec's own cache) with
    ``config.max_seq_len`` set to that length. ``load_autosplit_gen`` records each attention layer's
    device in ``model.cache_map`` (model.py ~L570-620), and a cache created afterwards without
    ``lazy`` allocates layer ``i`` on ``model.cache_map[i]`` (cache.py ``create_state_tensors``
    ~L85-95) and a Q cache its FP16 staging pair on every device of ``model.get_cache_devices()``
    (cache.py ``ExLlamaV2Cache_Q.__init__`` ~L459-461, model.py ``get_cache_devices`` ~L707). So a
    spec whose ``place_around`` differs from its own cache gets the placed-around lazy cache dropped
    and its own cache built in that placement, and a later spec with the same ``place_around`` (same
    variant, split, chunk, batch, attention, and a context no longer than the one loaded) reuses the
    model and rebuilds only the cache. ``PrepareInfo.placed_around`` then says the memory measured is
    not that spec's own load. Without ``place_around`` every autosplit spec is a fresh load.
    The usable context is the *requested* ``max_seq_len``, not ``cache.max_seq_len``:
    Q caches round the latter up to ``q_block`` after allocating their tensors.

Perplexity: before the first perplexity of a loaded model,
:func:`~optimizer.backends.causality.check_causal` verifies that logits do not depend on later
tokens; if they do, the trial fails with that reason instead of a too-low perplexity. Then see
:class:`~optimizer.backends.base.EvalProtocol` — per window, the first ``prefill``
tokens go in with ``preprocess_only=True``, the rest in ``score_chunk`` chunks through the cache;
log-softmax in FP32 (the head's padding columns are -65504, i.e. 0 after softmax). The window
is clamped to the requested context. Archs with ``requires_bos`` (Gemma family) refuse
``add_bos=False``; a protocol that scores nothing is an error, never a perplexity of 1.

The loops (causality check, perplexity windows, speed runs) are
:mod:`optimizer.backends.torch_measure`'s, shared with exllamav3; this module supplies how ids go
through exllamav2's model and cache (``_forward``).

Speed: random token ids (seeded) fill the cache to ``context_fill`` with one
``preprocess_only`` forward (``prompt_tok_s`` = fill / seconds), then ``gen_tokens`` greedy
single-token forwards (``gen_tok_s``, argmax on CPU per token, as ``test_inference.py -s``); each
timing is bracketed by ``torch.cuda.synchronize()`` after ``warmup`` untimed passes.

Memory: ``torch.cuda.max_memory_allocated(d)``, ``torch.cuda.memory_reserved(d)`` and ``total - free`` of
``torch.cuda.mem_get_info(d)`` per used device (``used - reserved`` is the overhead beyond torch's
allocator the trial saw: CUDA context, cuBLAS, other processes). Peaks are reset right before the cache is created
for single/manual loads (after the model load, so a fresh load and a reused model measure the same
thing: resident model + cache + inference transients) and for a cache built in an existing autosplit
placement, and before the load for an autosplit around the spec's own cache (built during the load). Timings synchronize every used device.

OOM: a CUDA out-of-memory error, autosplit's "Insufficient VRAM for model and cache" or a manual
split's "Insufficient space in device allocation" drops the cache and the model, empties torch's
cache (outside the ``except`` block, so the traceback no longer pins the tensors) and raises
:class:`~optimizer.errors.EngineOOMError` (the study records ``oom`` and goes on in the same process; the engine stays usable).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Sequence
from typing import Any

from optimizer.backends import torch_measure
from optimizer.backends.base import (
    EvalProtocol,
    LoadSpec,
    PrepareInfo,
    SpeedProtocol,
    SpeedResult,
)
from optimizer.backends.causality import CausalityResult
from optimizer.backends.torch_engine import TorchDevices, check_torch_cuda
from optimizer.backends.torch_measure import Forward
from optimizer.errors import EngineError
from optimizer.sources.download import local_path

#: cache mode -> exllamav2 class name
CACHE_CLASSES: dict[str, str] = {
    "fp16": "ExLlamaV2Cache",
    "fp8": "ExLlamaV2Cache_8bit",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
INSTALL_HINT = "pip install 'exl2opt[gpu]' with a CUDA build of torch"

#: reserve (bytes) handed to autosplit for visible GPUs beyond the planned ones: allocating it fails
#: with a CUDA OOM before anything is placed there (model.py ``load_autosplit_gen`` allocates the
#: reserve outside its OOM handler), so a spill is reported as ``oom``.
_NO_SPILL_RESERVE = 1 << 50


class ExLlamaV2Engine(TorchDevices):
    """One loaded exl2 model + cache at a time (see the module docstring)."""

    def __init__(self) -> None:
        import exllamav2
        import torch

        self.torch = torch
        self.xl = exllamav2
        self.model: Any = None
        self.cache: Any = None
        self.tokenizer: Any = None
        self.tokenizer_key = ""  #: variant key of ``tokenizer``
        self.spec: LoadSpec | None = None
        self.loaded_seq_len = 0
        #: autosplit: the (max_seq_len, cache) the loaded layers were placed around
        self.placed: tuple[int, str] | None = None
        self.model_dir = ""
        #: the causality check of the loaded model (None until its first perplexity)
        self.causality: CausalityResult | None = None

    # ----- loading ---------------------------------------------------------------------------

    def _cache_class(self, mode: str) -> Any:
        try:
            return getattr(self.xl, CACHE_CLASSES[mode])
        except KeyError:
            raise EngineError(f"exllamav2 has no cache mode {mode!r}") from None

    def _reusable(self, spec: LoadSpec) -> bool:
        s = self.spec
        if self.model is None or s is None or s.model_key != spec.model_key:
            return False
        if (s.chunk_len, s.batch_size, s.flash_attn) != (spec.chunk_len, spec.batch_size, spec.flash_attn):
            return False
        if spec.split.mode == "single":
            return spec.max_seq_len <= self.loaded_seq_len
        if spec.split.mode == "auto":  # placed around a cache: kept only for specs sharing that placement
            return (spec.place_around is not None and spec.placement == self.placed
                    and spec.max_seq_len <= self.loaded_seq_len)
        # manual: layer placement depends on config.max_seq_len
        return spec.max_seq_len == self.loaded_seq_len

    def _context(self) -> int:
        """Usable cache length in tokens: the requested one (Q caches round ``max_seq_len`` up)."""
        ctx = int(self.cache.max_seq_len)
        return min(ctx, self.spec.max_seq_len) if self.spec is not None else ctx

    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        reuse = self._reusable(spec)
        t0 = time.monotonic()
        self.spec = None  # until the spec is loaded; nothing below reads it
        if not reuse:
            self.unload()
            # downloads a Hub variant once, at its commit; after unload(), which clears model_dir
            self.model_dir = local_path(spec.variant)

        def load() -> None:
            self._drop_cache()
            if not reuse:
                self._load_model(spec)
            if self.cache is None:
                self._reset_peaks(spec.split.n_devices)
                cls = self._cache_class(spec.cache)
                self.cache = cls(self.model, batch_size=spec.batch_size, max_seq_len=spec.max_seq_len)

        label = spec.variant.label
        self._freeing(load, oom=lambda msg: f"out of memory loading {label} ({msg})",
                      failed=lambda msg: f"exllamav2 failed to load {label}: {msg}")
        self.spec = spec
        own = spec.split.mode != "auto" or (not reuse and spec.placement == (spec.max_seq_len, spec.cache))
        return PrepareInfo(model_loaded=not reuse, load_seconds=time.monotonic() - t0,
                           placed_around=None if own else self.placed)

    def _load_model(self, spec: LoadSpec) -> None:
        if not self.model_dir:
            raise EngineError(f"no local directory for {spec.variant.label}")
        split = spec.split
        # autosplit: RoPE tables, chunk and placement as for the configuration placed around
        seq_len, around = spec.placement if split.mode == "auto" else (spec.max_seq_len, spec.cache)
        if seq_len < spec.max_seq_len:
            raise EngineError(f"cannot place {spec.max_seq_len} tokens around a {seq_len}-token cache")
        config = self.xl.ExLlamaV2Config(self.model_dir)
        config.max_seq_len = seq_len
        chunk = min(spec.chunk_len, seq_len)
        config.max_input_len = chunk
        config.max_attention_size = chunk ** 2
        config.max_batch_size = spec.batch_size
        config.no_flash_attn = bool(config.no_flash_attn) or not spec.flash_attn
        config.arch_compat_overrides(quiet=True)
        config.no_sdpa = bool(config.no_sdpa) or not self._fast_attention(config)
        self.causality = None
        model = self.xl.ExLlamaV2(config)
        self.model = model
        if split.mode == "auto":
            self._reset_peaks(split.n_devices)
            cls = self._cache_class(around)
            self.cache = cls(model, batch_size=spec.batch_size, max_seq_len=seq_len, lazy=True)
            reserve = [int(b) for b in split.reserve_bytes]
            reserve += [_NO_SPILL_RESERVE] * max(self.torch.cuda.device_count() - len(reserve), 0)
            model.load_autosplit(self.cache, reserve_vram=reserve, progress=False)
            self.placed = (seq_len, around)
            if (seq_len, around) != (spec.max_seq_len, spec.cache):
                self._drop_cache()  # prepare() builds the spec's own cache on model.cache_map's devices
        elif split.mode == "manual":
            model.load(gpu_split=[float(g) for g in split.gpu_split], progress=False)
        else:
            model.load(progress=False)
        if self.tokenizer is None or self.tokenizer_key != spec.variant.key:
            self.tokenizer = self.xl.ExLlamaV2Tokenizer(config)
            self.tokenizer_key = spec.variant.key
        self.loaded_seq_len = seq_len

    def _fast_attention(self, config: Any) -> bool:
        """Whether exllamav2 will attend with flash-attn or xformers (both mask causally) for ``config``."""
        attn = self.xl.attn
        return bool((attn.has_flash_attn and not config.no_flash_attn) or (attn.has_xformers and not config.no_xformers))

    def check_causality(self) -> CausalityResult:
        """Run :func:`~optimizer.backends.causality.check_causal` on the loaded model and cache."""
        return torch_measure.check_causality(self._forward())

    def _forward(self) -> Forward:
        """The loaded model and cache as the shared measurement loops drive them (exllamav2 tracks the
        position in ``cache.current_seq_len``, so ``past`` is implied)."""
        model, cache = self.model, self.cache

        def reset() -> None:
            cache.current_seq_len = 0

        def prefill(ids: Any, past: int) -> None:
            model.forward(ids, cache, preprocess_only=True)

        def logits(ids: Any, past: int) -> Any:
            # FP16 logits (1, n, vocab padded to 32); padding columns are -65504, i.e. exactly 0 after
            # an FP32 softmax, and never the argmax, so they need no slicing
            return model.forward(ids, cache)

        return Forward(torch=self.torch, context=self._context(), vocab_size=int(model.config.vocab_size),
                       reset=reset, prefill=prefill, logits=logits, sync=self._sync)

    def _drop_cache(self) -> None:
        if self.cache is not None:
            self.cache = None
            gc.collect()
            if self.torch.cuda.is_available():
                self.torch.cuda.empty_cache()

    def unload(self) -> None:
        self.cache = None
        if self.model is not None:
            # a half-loaded model may fail to unload; its memory is freed below anyway
            with contextlib.suppress(Exception):
                self.model.unload()
        self.model = None
        self.loaded_seq_len = 0
        self.placed = None
        self.model_dir = ""
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()

    def close(self) -> None:
        self.unload()
        self.tokenizer = None
        self.tokenizer_key = ""
        self.spec = None

    # ----- measurements ----------------------------------------------------------------------

    def tokenize(self, text: str) -> Sequence[int]:
        if self.tokenizer is None:
            raise EngineError("no model loaded")
        ids = self.tokenizer.encode(text, add_bos=False)
        return [int(x) for x in ids[0].tolist()]

    def perplexity(self, *, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        return self._guard("perplexity", lambda: self._perplexity(tokens, protocol))

    def _perplexity(self, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        lm = getattr(getattr(self.model.config, "arch", None), "lm", None)
        if getattr(lm, "requires_bos", False) and not protocol.add_bos:
            raise EngineError("this architecture is incoherent without BOS (exllamav2 requires_bos); "
                              "measure it with BOS")
        if self.causality is None:
            self.causality = self.check_causality()
        if not self.causality.passed:
            raise EngineError(f"refusing to measure perplexity: exllamav2 does not attend causally here ({self.causality.line()}); "
                              "install flash-attn or report this setup")
        return torch_measure.perplexity(self._forward(), tokens=tokens, protocol=protocol,
                                        bos=getattr(self.tokenizer, "bos_token_id", None))

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        return self._guard("speed test", lambda: torch_measure.speed(self._forward(), protocol=protocol))


class ExLlamaV2Backend:
    """Backend for exl2 variants on CUDA GPUs."""

    name = "exllamav2"
    formats: tuple[str, ...] = ("exl2",)

    def check_available(self) -> None:
        check_torch_cuda(engine="exllamav2", module="exllamav2", hint=INSTALL_HINT)

    def open(self) -> ExLlamaV2Engine:
        self.check_available()
        return ExLlamaV2Engine()


def make_backend() -> ExLlamaV2Backend:
    return ExLlamaV2Backend()

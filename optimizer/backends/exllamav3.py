"""The ExLlamaV3 1.6.5 measurement backend (EXL3 variants). torch and exllamav3 are imported lazily.

Loading (per :class:`~optimizer.backends.base.LoadSpec`), on exllamav3's own API:
    * ``config = Config.from_directory(dir)``; ``model = Model.from_config(config)``;
    * the cache *first*: ``Cache(model, max_num_tokens=S, layer_type=CacheLayer_fp16)`` or
      ``layer_type=CacheLayer_quant, k_bits=k, v_bits=v`` (mode ``k4v6``); exllamav3 allocates each
      cache layer while its attention module loads, so a cache made after the load has no tensors;
    * single GPU: ``model.load(device="cuda:0", max_chunk_size=c)``; manual split:
      ``model.load(use_per_device=[GiB...], max_chunk_size=c)`` (``c`` = the chunk, at most the cache:
      exllamav3 measures one chunk through the cache); autosplit:
      ``model.load(reserve_per_device=[GiB...], max_chunk_size=c)`` with a negative reserve (exllamav3's
      "do not use this device") for visible GPUs beyond the planned ones, so a spill is an
      out-of-memory rather than a silently larger split;
    * ``Tokenizer.from_config(config)``.
    A single-GPU model is kept across trials of the same variant; only the cache is rebuilt: the old
    cache is detached (``Cache.detach_from_model``) and its layers freed, the new one attaches itself
    and its layers are allocated on their attention module's device (``CacheLayer.alloc``), exactly
    what ``Attention.load_local`` does during a load. Split loads place layers around the cache, so
    they reload whenever the cache changes; ``LoadSpec.place_around`` is ignored (the VRAM model does
    not check a cache in another cache's EXL3 placement), so ``PrepareInfo.placed_around`` stays None.

Perplexity: as for exl2 (:class:`~optimizer.backends.base.EvalProtocol`), through the cache. Per
window: ``model.prefill(ids[:prefill], params)`` writes the first tokens, then ``model.forward`` of
``score_chunk``-token chunks with ``params = {"attn_mode": "flash_attn", "cache": cache, "past_len": p,
"batch_shape": (1, S)}``; logits are cut to the real vocabulary and log-softmaxed in FP32.

The loops (perplexity windows, speed runs) are :mod:`optimizer.backends.torch_measure`'s, shared with
exllamav2; this module supplies how ids go through exllamav3's model and cache (``_forward``).

Speed: seeded random ids; ``model.prefill`` of ``context_fill`` tokens (prompt tokens/s), then
``gen_tokens`` greedy single-token ``model.forward`` calls (argmax on CPU each step), timed between
``torch.cuda.synchronize`` of every used device after ``warmup`` untimed passes.

Memory and OOM: as the exllamav2 backend (``torch.cuda`` peaks reset before the load, since the cache
is allocated inside it); "Insufficient VRAM in split" counts as out of memory.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

from optimizer.backends import torch_measure
from optimizer.backends.base import EvalProtocol, LoadSpec, PrepareInfo, SpeedProtocol, SpeedResult
from optimizer.backends.torch_engine import TorchDevices, check_torch_cuda
from optimizer.backends.torch_measure import Forward
from optimizer.errors import EngineError
from optimizer.formats.exl3 import cache_mode
from optimizer.sources.download import local_path
from optimizer.vram import GIB

INSTALL_HINT = "pip install 'exl2opt[exl3]' with a CUDA build of torch (exllamav3 1.6.5 builds its extension on first import)"

#: ``reserve_per_device`` (GiB) for visible GPUs beyond the planned ones: exllamav3 skips negative reserves.
_EXCLUDE = -1.0


class ExLlamaV3Engine(TorchDevices):
    """One loaded EXL3 model + cache at a time (see the module docstring)."""

    def __init__(self) -> None:
        import exllamav3
        import torch

        self.torch = torch
        self.xl = exllamav3
        self.config: Any = None
        self.model: Any = None
        self.cache: Any = None
        self.tokenizer: Any = None
        self.spec: LoadSpec | None = None
        self.model_dir = ""

    # ----- loading ---------------------------------------------------------------------------

    def _new_cache(self, spec: LoadSpec) -> Any:
        from exllamav3.cache import CacheLayer_fp16, CacheLayer_quant

        mode = cache_mode(spec.cache)
        if mode.quantized:
            return self.xl.Cache(self.model, max_num_tokens=spec.max_seq_len, layer_type=CacheLayer_quant,
                                 k_bits=mode.k_bits, v_bits=mode.v_bits)
        return self.xl.Cache(self.model, max_num_tokens=spec.max_seq_len, layer_type=CacheLayer_fp16)

    def _reusable(self, spec: LoadSpec) -> bool:
        s = self.spec
        return (self.model is not None and s is not None and s.model_key == spec.model_key
                and spec.split.mode == "single" and s.chunk_len == spec.chunk_len)

    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        cache_mode(spec.cache)  # a bad mode is a usage error before anything is freed
        reuse = self._reusable(spec)
        t0 = time.monotonic()
        self.spec = None  # until the spec is loaded (a fresh load rebuilds the tokenizer: _load sees no spec)
        if not reuse:
            self.unload()
            self.model_dir = local_path(spec.variant)
        label = spec.variant.label
        self._freeing(lambda: self._swap_cache(spec) if reuse else self._load(spec),
                      oom=lambda msg: f"out of memory loading {label} ({msg})",
                      failed=lambda msg: f"exllamav3 failed to load {label}: {msg}")
        self.spec = spec
        return PrepareInfo(model_loaded=not reuse, load_seconds=time.monotonic() - t0)

    def _load(self, spec: LoadSpec) -> None:
        if not self.model_dir:
            raise EngineError(f"no local directory for {spec.variant.label}")
        self.config = self.xl.Config.from_directory(self.model_dir)
        self.model = self.xl.Model.from_config(self.config)
        self.cache = self._new_cache(spec)  # before the load: its layers are allocated by it
        from optimizer.formats.exl3_rules import load_chunk

        split, chunk = spec.split, load_chunk(chunk_len=spec.chunk_len, max_seq_len=spec.max_seq_len)
        self._reset_peaks(split.n_devices)
        if split.mode == "single":
            self.model.load(device="cuda:0", max_chunk_size=chunk, progressbar=False)
        elif split.mode == "manual":
            self.model.load(use_per_device=[float(g) for g in split.gpu_split], max_chunk_size=chunk, progressbar=False)
        else:
            from optimizer.formats.exl3_place import reserves_for

            reserve = [b / GIB for b in reserves_for(split, split.n_devices)]
            reserve += [_EXCLUDE] * max(self.torch.cuda.device_count() - len(reserve), 0)
            self.model.load(reserve_per_device=reserve, max_chunk_size=chunk, progressbar=False)
        if self.tokenizer is None or self.spec is None or self.spec.variant.key != spec.variant.key:
            self.tokenizer = self.xl.Tokenizer.from_config(self.config)

    def _swap_cache(self, spec: LoadSpec) -> None:
        """A new cache on the loaded model, allocated where each attention module lives."""
        self._drop_cache()
        self._reset_peaks(spec.split.n_devices)
        cache = self._new_cache(spec)
        self.cache = cache
        for module in self.model.get_cache_layers():
            for layer in module.cache_layers:
                if layer.cache_id == id(cache):
                    layer.alloc(module.device)
        cache.initialized = True

    def _drop_cache(self) -> None:
        cache, self.cache = self.cache, None
        if cache is not None and self.model is not None:
            for layer in cache.layers.values():
                layer.free()
            cache.detach_from_model(self.model)
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()

    def unload(self) -> None:
        if self.model is not None:
            try:
                self._drop_cache()
                self.model.unload()
            except Exception:  # a half-loaded model may fail to unload; its memory is freed below anyway
                pass
        self.model = self.cache = self.config = None
        self.model_dir = ""
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()

    def close(self) -> None:
        self.unload()
        self.tokenizer = None
        self.spec = None

    # ----- measurements ----------------------------------------------------------------------

    def _params(self, past: int) -> dict[str, Any]:
        return {"attn_mode": "flash_attn", "cache": self.cache, "past_len": past,
                "batch_shape": (1, int(self.cache.max_num_tokens))}

    def _forward(self) -> Forward:
        """The loaded model and cache as the shared measurement loops drive them (every call names its
        ``past_len``, so there is nothing to reset); logits are cut to the real vocabulary."""
        model, vocab = self.model, int(self.config.vocab_size)

        def prefill(ids: Any, past: int) -> None:
            model.prefill(ids, self._params(past))

        def logits(ids: Any, past: int) -> Any:
            return model.forward(ids, self._params(past))[..., :vocab]

        return Forward(torch=self.torch, context=int(self.cache.max_num_tokens), vocab_size=vocab,
                       reset=lambda: None, prefill=prefill, logits=logits, sync=self._sync)

    def tokenize(self, text: str) -> Sequence[int]:
        if self.tokenizer is None:
            raise EngineError("no model loaded")
        return [int(x) for x in self.tokenizer.encode(text, add_bos=False)[0].tolist()]

    def perplexity(self, *, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return self._guard("perplexity", lambda: torch_measure.perplexity(self._forward(), tokens=tokens,
                                                                          protocol=protocol, bos=bos))

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        return self._guard("speed test", lambda: torch_measure.speed(self._forward(), protocol=protocol))


class ExLlamaV3Backend:
    """Backend for EXL3 variants on CUDA GPUs."""

    name = "exllamav3"
    formats: tuple[str, ...] = ("exl3",)

    def check_available(self) -> None:
        check_torch_cuda(engine="exllamav3", module="exllamav3", hint=INSTALL_HINT)

    def open(self) -> ExLlamaV3Engine:
        self.check_available()
        return ExLlamaV3Engine()


def make_backend() -> ExLlamaV3Backend:
    return ExLlamaV3Backend()

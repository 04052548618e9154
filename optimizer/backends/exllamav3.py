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

Speed: seeded random ids; ``model.prefill`` of ``context_fill`` tokens (prompt tokens/s), then
``gen_tokens`` greedy single-token ``model.forward`` calls (argmax on CPU each step), timed between
``torch.cuda.synchronize`` of every used device after ``warmup`` untimed passes.

Memory and OOM: as the exllamav2 backend (``torch.cuda`` peaks reset before the load, since the cache
is allocated inside it); "Insufficient VRAM in split" counts as out of memory.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from typing import Any

from optimizer.backends.base import EvalProtocol, LoadSpec, PrepareInfo, SpeedProtocol, SpeedResult
from optimizer.backends.progress import window_done
from optimizer.backends.torch_engine import TorchDevices, check_torch_cuda, is_oom, one_line
from optimizer.errors import EngineError, EngineOOMError
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
        msg, oom = "", False
        err: EngineError | None = None
        if not reuse:
            self.unload()
            self.spec = None
            self.model_dir = local_path(spec.variant)
        try:
            if reuse:
                self._swap_cache(spec)
            else:
                self._load(spec)
        except EngineError as e:
            err = e
        except Exception as e:
            msg, oom = one_line(e), is_oom(e)
        if err is not None or msg:
            self.spec = None
            self.unload()  # outside the except block: the traceback no longer pins tensors
            if err is not None:
                raise err
            if oom:
                raise EngineOOMError(f"out of memory loading {spec.variant.label} ({msg})")
            raise EngineError(f"exllamav3 failed to load {spec.variant.label}: {msg}")
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

    def _guard(self, what: str, fn: Any) -> Any:
        if self.model is None or self.cache is None:
            raise EngineError(f"{what}: no model loaded")
        label = self.spec.variant.label if self.spec else "?"
        msg, oom = "", False
        err: EngineError | None = None
        try:
            return fn()
        except EngineError as e:
            err = e
        except Exception as e:
            msg, oom = one_line(e), is_oom(e)
        self.unload()
        if err is not None:
            raise err
        if oom:
            raise EngineOOMError(f"out of memory during {what} of {label}")
        raise EngineError(f"{what} of {label} failed: {msg}")

    def _params(self, past: int) -> dict[str, Any]:
        return {"attn_mode": "flash_attn", "cache": self.cache, "past_len": past,
                "batch_shape": (1, int(self.cache.max_num_tokens))}

    def tokenize(self, text: str) -> Sequence[int]:
        if self.tokenizer is None:
            raise EngineError("no model loaded")
        return [int(x) for x in self.tokenizer.encode(text, add_bos=False)[0].tolist()]

    def perplexity(self, *, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        return float(self._guard("perplexity", lambda: self._perplexity(tokens, protocol)))

    def _perplexity(self, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        torch, model = self.torch, self.model
        p = protocol.fitted(int(self.cache.max_num_tokens))
        window, prefill = p.window, p.prefill
        if prefill >= window - 1:
            raise EngineError(f"nothing to score: prefill {prefill} leaves no scored token in a {window}-token window")
        n = min(p.n_windows, len(tokens) // window)
        if n < 1:
            raise EngineError(f"evaluation text too short: {len(tokens)} tokens for one {window}-token window")
        vocab = int(self.config.vocab_size)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        nll, count = 0.0, 0
        with torch.inference_mode():
            for i in range(n):
                ids = list(tokens[i * window:(i + 1) * window])
                if p.add_bos and bos is not None:
                    ids[0] = int(bos)
                t = torch.tensor([ids], dtype=torch.long)
                if prefill > 0:
                    model.prefill(t[:, :prefill], self._params(0))
                pos = prefill
                while pos < window:
                    end = min(pos + p.score_chunk, window)
                    logits = model.forward(t[:, pos:end], self._params(pos))[..., :vocab].float()
                    targets = t[:, pos + 1:end + 1].to(logits.device)
                    lp = torch.log_softmax(logits[:, :targets.shape[1]], dim=-1)
                    nll -= float(lp.gather(-1, targets.unsqueeze(-1)).sum())
                    count += int(targets.numel())
                    pos = end
                window_done(i + 1, n)
        return math.exp(nll / count)

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        return self._guard("speed test", lambda: self._speed(protocol))  # type: ignore[no-any-return]

    def _speed(self, protocol: SpeedProtocol) -> SpeedResult:
        torch, model = self.torch, self.model
        fill = max(min(protocol.context_fill, int(self.cache.max_num_tokens) - protocol.gen_tokens), 1)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(self.config.vocab_size), (1, fill), generator=g, dtype=torch.long)
        with torch.inference_mode():
            for _ in range(protocol.warmup):
                model.prefill(ids[:, :min(fill, 256)], self._params(0))
                model.forward(ids[:, -1:], self._params(min(fill, 256)))
            prompt_s, gen_s = [], []
            for _ in range(max(1, protocol.repeats)):
                self._sync()
                t0 = time.perf_counter()
                model.prefill(ids, self._params(0))
                self._sync()
                prompt_s.append(time.perf_counter() - t0)
                tok = ids[:, -1:]
                t0 = time.perf_counter()
                for k in range(protocol.gen_tokens):
                    logits = model.forward(tok, self._params(fill + k))
                    tok = logits[:, -1, :int(self.config.vocab_size)].argmax(dim=-1, keepdim=True).cpu()
                self._sync()
                gen_s.append(time.perf_counter() - t0)
        return SpeedResult.of_runs(prompt_s=prompt_s, gen_s=gen_s, context_fill=fill, gen_tokens=protocol.gen_tokens)


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

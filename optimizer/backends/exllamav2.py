"""The ExLlamaV2 0.3.2 measurement backend (exl2 variants). torch and exllamav2 are imported lazily.

Loading (per :class:`~optimizer.backends.base.LoadSpec`):
    * ``config = ExLlamaV2Config(dir)``; ``config.max_seq_len``, ``max_input_len`` (= chunk),
      ``max_attention_size`` (= chunk**2), ``max_batch_size`` and ``no_flash_attn`` set per load;
    * single GPU: ``model.load()``; manual split: ``model.load(gpu_split=[GiB...])``, then the cache;
    * autosplit: ``cache = Cls(model, max_seq_len=S, lazy=True)`` then
      ``model.load_autosplit(cache, reserve_vram=[bytes...])``;
    * cache class per mode: fp16 ``ExLlamaV2Cache``, fp8 ``ExLlamaV2Cache_8bit``, q8/q6/q4
      ``ExLlamaV2Cache_Q8/_Q6/_Q4``.
    The model is kept across trials of the same variant and split (single/manual) as long as the
    requested context is not larger than the one it was loaded with (the RoPE tables are sized by
    ``config.max_seq_len`` at load); then only the cache is rebuilt. The study orders contexts
    descending, so each variant is loaded once. Autosplit places weights around the cache, so it
    reloads whenever the cache changes.

Perplexity: see :class:`~optimizer.backends.base.EvalProtocol` — per window, the first ``prefill``
tokens go in with ``preprocess_only=True``, the rest in ``score_chunk`` chunks through the cache;
log-softmax in FP32. The window is clamped to the allocated context.

Speed: random token ids (seeded) fill the cache to ``context_fill`` with one
``preprocess_only`` forward (``prompt_tok_s`` = fill / seconds), then ``gen_tokens`` greedy
single-token forwards (``gen_tok_s``, argmax on CPU per token, as ``test_inference.py -s``); each
timing is bracketed by ``torch.cuda.synchronize()`` after ``warmup`` untimed passes.

Memory: ``torch.cuda.max_memory_allocated(d)`` (peak since this prepare, after
``reset_peak_memory_stats``) and ``total - free`` of ``torch.cuda.mem_get_info(d)`` per used device.

OOM: a CUDA out-of-memory error, or autosplit's "Insufficient VRAM for model and cache", drops the
cache and the model, empties torch's cache and raises :class:`~optimizer.errors.EngineOOMError`
(the study records ``oom`` and goes on in the same process; the engine stays usable).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Sequence
from typing import Any

from optimizer.backends.base import (
    DeviceMemory,
    EvalProtocol,
    LoadSpec,
    PrepareInfo,
    SpeedProtocol,
    SpeedResult,
)
from optimizer.errors import BackendUnavailableError, EngineError, EngineOOMError
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


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return (type(e).__name__ == "OutOfMemoryError" or "out of memory" in text.lower()
            or "Insufficient VRAM" in text or "Insufficient space in device allocation" in text)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


class ExLlamaV2Engine:
    """One loaded exl2 model + cache at a time (see the module docstring)."""

    def __init__(self) -> None:
        import exllamav2
        import torch

        self.torch = torch
        self.xl = exllamav2
        self.model: Any = None
        self.cache: Any = None
        self.tokenizer: Any = None
        self.spec: LoadSpec | None = None
        self.loaded_seq_len = 0
        self.model_dir = ""

    # ----- loading ---------------------------------------------------------------------------

    def _cache_class(self, mode: str) -> Any:
        try:
            return getattr(self.xl, CACHE_CLASSES[mode])
        except KeyError:
            raise EngineError(f"exllamav2 has no cache mode {mode!r}") from None

    def _reusable(self, spec: LoadSpec) -> bool:
        s = self.spec
        return (self.model is not None and s is not None and s.model_key == spec.model_key
                and spec.split.mode != "auto" and spec.max_seq_len <= self.loaded_seq_len
                and (s.chunk_len, s.batch_size, s.flash_attn) == (spec.chunk_len, spec.batch_size, spec.flash_attn))

    def _reset_peaks(self, n: int) -> None:
        for d in range(min(n, self.torch.cuda.device_count())):
            self.torch.cuda.reset_peak_memory_stats(d)

    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        reuse = self._reusable(spec)
        if not reuse:
            self.model_dir = local_path(spec.variant)  # downloads a Hub variant once, at its commit
        t0 = time.monotonic()
        try:
            self._drop_cache()
            if not reuse:
                self.unload()
            self._reset_peaks(max(spec.split.n_devices, 1))
            if not reuse:
                self._load_model(spec)
            if self.cache is None:
                cls = self._cache_class(spec.cache)
                self.cache = cls(self.model, batch_size=spec.batch_size, max_seq_len=spec.max_seq_len)
        except EngineError:
            self.unload()
            raise
        except Exception as e:
            self.unload()
            if _is_oom(e):
                raise EngineOOMError(f"out of memory loading {spec.variant.label} ({_one_line(e)})") from None
            raise EngineError(f"exllamav2 failed to load {spec.variant.label}: {_one_line(e)}") from None
        self.spec = spec
        return PrepareInfo(model_loaded=not reuse, load_seconds=time.monotonic() - t0)

    def _load_model(self, spec: LoadSpec) -> None:
        config = self.xl.ExLlamaV2Config(self.model_dir)
        config.max_seq_len = spec.max_seq_len
        config.max_input_len = spec.chunk_len
        config.max_attention_size = spec.chunk_len ** 2
        config.max_batch_size = spec.batch_size
        config.no_flash_attn = not spec.flash_attn
        model = self.xl.ExLlamaV2(config)
        self.model = model
        split = spec.split
        if split.mode == "auto":
            cls = self._cache_class(spec.cache)
            self.cache = cls(model, batch_size=spec.batch_size, max_seq_len=spec.max_seq_len, lazy=True)
            model.load_autosplit(self.cache, reserve_vram=list(split.reserve_bytes), progress=False)
        elif split.mode == "manual":
            model.load(gpu_split=list(split.gpu_split), progress=False)
        else:
            model.load(progress=False)
        if self.tokenizer is None or self.spec is None or self.spec.variant.key != spec.variant.key:
            self.tokenizer = self.xl.ExLlamaV2Tokenizer(config)
        self.loaded_seq_len = spec.max_seq_len

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
        try:
            return fn()
        except Exception as e:
            label = self.spec.variant.label if self.spec else "?"
            if _is_oom(e):
                self.unload()
                raise EngineOOMError(f"out of memory during {what} of {label}") from None
            self.unload()
            raise EngineError(f"{what} of {label} failed: {_one_line(e)}") from None

    def tokenize(self, text: str) -> Sequence[int]:
        if self.tokenizer is None:
            raise EngineError("no model loaded")
        ids = self.tokenizer.encode(text, add_bos=False)
        return [int(x) for x in ids[0].tolist()]

    def perplexity(self, *, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        return float(self._guard("perplexity", lambda: self._perplexity(tokens, protocol)))

    def _perplexity(self, tokens: Sequence[int], protocol: EvalProtocol) -> float:
        torch, model, cache = self.torch, self.model, self.cache
        window = min(protocol.window, cache.max_seq_len)
        prefill = min(protocol.prefill, window // 2) if protocol.window > window else protocol.prefill
        n = min(protocol.n_windows, len(tokens) // window)
        if n < 1:
            raise EngineError(f"evaluation text too short: {len(tokens)} tokens for one {window}-token window")
        bos = getattr(self.tokenizer, "bos_token_id", None)
        nll, count = 0.0, 0
        with torch.inference_mode():
            for i in range(n):
                ids = list(tokens[i * window:(i + 1) * window])
                if protocol.add_bos and bos is not None:
                    ids[0] = int(bos)
                t = torch.tensor(ids, dtype=torch.long).unsqueeze(0)
                cache.current_seq_len = 0
                if prefill > 0:
                    model.forward(t[:, :prefill], cache, preprocess_only=True)
                pos = prefill
                while pos < window:
                    end = min(pos + protocol.score_chunk, window)
                    logits = model.forward(t[:, pos:end], cache).float()
                    targets = t[:, pos + 1:end + 1].to(logits.device)
                    lp = torch.log_softmax(logits[:, :targets.shape[1]], dim=-1)
                    nll -= float(lp.gather(-1, targets.unsqueeze(-1)).sum())
                    count += int(targets.numel())
                    pos = end
        import math

        return math.exp(nll / max(count, 1))

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        return self._guard("speed test", lambda: self._speed(protocol))  # type: ignore[no-any-return]

    def _speed(self, protocol: SpeedProtocol) -> SpeedResult:
        torch, model, cache = self.torch, self.model, self.cache
        fill = max(min(protocol.context_fill, cache.max_seq_len - protocol.gen_tokens), 1)
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, fill), generator=g, dtype=torch.long)
        with torch.inference_mode():
            for _ in range(protocol.warmup):
                cache.current_seq_len = 0
                model.forward(ids[:, :min(fill, 256)], cache, preprocess_only=True)
                model.forward(ids[:, -1:], cache)
            cache.current_seq_len = 0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.forward(ids, cache, preprocess_only=True)
            torch.cuda.synchronize()
            prompt_s = time.perf_counter() - t0
            tok = ids[:, -1:]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(protocol.gen_tokens):
                logits = model.forward(tok, cache)
                tok = logits[:, -1, :].argmax(dim=-1, keepdim=True).cpu()
            torch.cuda.synchronize()
            gen_s = time.perf_counter() - t0
        return SpeedResult(prompt_tok_s=fill / max(prompt_s, 1e-9), gen_tok_s=protocol.gen_tokens / max(gen_s, 1e-9),
                           context_fill=fill)

    def memory(self) -> tuple[DeviceMemory, ...]:
        torch = self.torch
        n = max(self.spec.split.n_devices if self.spec else 1, 1)
        out = []
        for d in range(min(n, torch.cuda.device_count())):
            free, total = torch.cuda.mem_get_info(d)
            out.append(DeviceMemory(index=d, peak_allocated=int(torch.cuda.max_memory_allocated(d)), used=int(total - free)))
        return tuple(out)


class ExLlamaV2Backend:
    """Backend for exl2 variants on CUDA GPUs."""

    name = "exllamav2"
    formats: tuple[str, ...] = ("exl2",)

    def check_available(self) -> None:
        try:
            import torch
        except ImportError:
            raise BackendUnavailableError(f"the exllamav2 backend needs torch ({INSTALL_HINT})") from None
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"the exllamav2 backend needs a CUDA GPU (torch {torch.__version__} "
                                          "sees none); run `exl2opt plan` for predictions without a GPU")
        try:
            import exllamav2  # noqa: F401
        except Exception as e:  # ImportError, or OSError from the JIT build of exllamav2_ext
            raise BackendUnavailableError(f"cannot import exllamav2 ({_one_line(e)}); {INSTALL_HINT}") from None

    def open(self) -> ExLlamaV2Engine:
        self.check_available()
        return ExLlamaV2Engine()


def make_backend() -> ExLlamaV2Backend:
    return ExLlamaV2Backend()

"""What the PyTorch-based engines (exllamav2, exllamav3) share: CUDA device bookkeeping, error text and
the rule that a failed load or measurement frees the GPU and becomes one line (their measurement loops
are :mod:`optimizer.backends.torch_measure`).

No heavy import at module level: the engine passes in its own ``torch`` module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from optimizer.backends.base import DeviceMemory, LoadSpec
from optimizer.errors import BackendUnavailableError, EngineError, EngineOOMError

T = TypeVar("T")


def one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, cut to 200 characters (for one-line error messages)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory failure of torch, exllamav2 or exllamav3."""
    text = str(e)
    return (type(e).__name__ == "OutOfMemoryError" or "out of memory" in text.lower()
            or "Insufficient VRAM" in text or "Insufficient space in device allocation" in text)


def check_torch_cuda(*, engine: str, module: str, hint: str) -> None:
    """Raise :class:`BackendUnavailableError` (one line) unless torch sees a CUDA GPU and ``module`` imports."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(f"the {engine} backend needs torch ({hint})") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"the {engine} backend needs a CUDA GPU (torch {torch.__version__} "
                                      "sees none); exl2opt plan with the same options predicts without a GPU")
    try:
        __import__(module)
    except Exception as e:  # ImportError, or OSError from the JIT build of the engine's extension
        raise BackendUnavailableError(f"cannot import {module} ({one_line(e)}); {hint}") from None


class TorchDevices:
    """Per-device peaks, synchronisation and memory readings over the GPUs a loaded spec uses, and the
    failure handling of loads and measurements.

    Subclasses set ``self.torch`` (the torch module), ``self.spec`` (the loaded :class:`LoadSpec`
    or None), ``self.model`` and ``self.cache`` (None when not loaded), and define ``unload()``.
    Memory figures are bytes.
    """

    torch: Any
    spec: LoadSpec | None
    model: Any
    cache: Any

    def unload(self) -> None:
        raise NotImplementedError

    def _freeing(self, fn: Callable[[], T], *, oom: Callable[[str], str], failed: Callable[[str], str]) -> T:
        """``fn()``; when it raises, :meth:`unload` and raise one line: an :class:`EngineError` as it
        is, an out-of-memory failure as ``EngineOOMError(oom(line))``, anything else as
        ``EngineError(failed(line))`` (``line``: :func:`one_line` of the exception). The engine unloads
        outside the ``except`` block, so the traceback no longer pins the model and cache tensors."""
        err: EngineError | None = None
        msg, out_of_memory = "", False
        try:
            return fn()
        except EngineError as e:
            err = e
        except Exception as e:
            msg, out_of_memory = one_line(e), is_oom(e)
        self.unload()
        if err is not None:
            raise err
        raise EngineOOMError(oom(msg)) if out_of_memory else EngineError(failed(msg))

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        """Run measurement ``what`` of the loaded model and cache under :meth:`_freeing`."""
        if self.model is None or self.cache is None:
            raise EngineError(f"{what}: no model loaded")
        label = self.spec.variant.label if self.spec else "?"
        return self._freeing(fn, oom=lambda _: f"out of memory during {what} of {label}",
                             failed=lambda msg: f"{what} of {label} failed: {msg}")

    def _devices(self, n: int) -> range:
        return range(min(max(n, 1), self.torch.cuda.device_count()))

    def _reset_peaks(self, n: int) -> None:
        for d in self._devices(n):
            self.torch.cuda.reset_peak_memory_stats(d)

    def _sync(self) -> None:
        """Wait for every used device (the engines run each device on its own stream)."""
        for d in self._devices(self.spec.split.n_devices if self.spec else 1):
            self.torch.cuda.synchronize(d)

    def memory(self) -> tuple[DeviceMemory, ...]:
        """Peak allocated, used (``mem_get_info``) and reserved bytes of every used device."""
        torch = self.torch
        out = []
        for d in self._devices(self.spec.split.n_devices if self.spec else 1):
            free, total = torch.cuda.mem_get_info(d)
            out.append(DeviceMemory(index=d, peak_allocated=int(torch.cuda.max_memory_allocated(d)), used=int(total - free),
                                    reserved=int(torch.cuda.memory_reserved(d))))
        return tuple(out)

"""``exl2opt calibrate``'s measurement: the device memory a run uses beyond torch's reserved pool (bytes).

Initialises CUDA on each visible GPU the way a measurement run does, then reads
``cudaMemGetInfo`` and torch's reserved bytes:
    1. torch's CUDA context (a one-element tensor);
    2. exllamav2's extension (imported, which JIT-builds it once if needed, then a few of its
       kernels run: RMSNorm, RoPE, the Q4 cache quantizer), so its kernel images are loaded;
    3. a cuBLAS FP16 matmul (cuBLAS handle and workspace);
    4. flash-attn, if importable (one causal call).
``overhead = (total - free) - torch.cuda.memory_reserved`` includes other processes on the GPU, so
run it on an idle GPU. Kernels that later work loads lazily (exl2 GEMM variants) are not in it.
No model is downloaded; after the first build of the extension it takes seconds.
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any

from optimizer.calibration import CalibrationRecord, GpuIdentity, now_text, torch_version
from optimizer.errors import BackendUnavailableError


def _driver_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    return "unknown"


def _touch_exllamav2_ext(torch: Any, dev: Any) -> None:
    import exllamav2  # noqa: F401  (builds/loads exllamav2_ext)
    from exllamav2.ext import exllamav2_ext as ext

    x = torch.randn(4, 256, dtype=torch.half, device=dev)
    ext.rms_norm(x, torch.ones(256, dtype=torch.half, device=dev), torch.empty_like(x), 1e-6)
    q = torch.randn(1, 4, 2, 128, dtype=torch.half, device=dev)
    sin = torch.zeros(1, 1, 16, 128, dtype=torch.half, device=dev)
    ext.rope_(q, sin, torch.ones_like(sin), 0, 2, 128, torch.empty((1, 1), device="meta"), True)
    k = torch.randn(1, 8, 2, 128, dtype=torch.half, device=dev)
    out = torch.zeros(1, 8, 2, 64, dtype=torch.uint8, device=dev)
    scales = torch.zeros(1, 8, 2, 4, dtype=torch.half, device=dev)
    none = torch.empty((1, 1), device="meta")
    ext.fp16_to_q_kv(k, out, scales, k.clone(), out.clone(), scales.clone(), 1, 0, 8, 0, none, none, 4)


def _touch_flash_attn(torch: Any, dev: Any) -> bool:
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return False
    q = torch.randn(1, 16, 4, 64, dtype=torch.half, device=dev)
    flash_attn_func(q, q, q, causal=True)
    return True


def measure(*, device_index: int) -> CalibrationRecord:
    """Initialise CUDA on ``device_index`` like a run and measure the overhead (see the module docstring).

    Raises:
        BackendUnavailableError: no CUDA GPU, or the exllamav2 extension cannot be loaded.
    """
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("calibrate needs torch with CUDA; nothing was stored") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"calibrate needs a CUDA GPU: torch {torch.__version__} sees none; nothing was stored")
    dev = torch.device("cuda", device_index)
    torch.cuda.set_device(dev)
    done = ["torch"]
    torch.zeros(1, device=dev)
    try:
        _touch_exllamav2_ext(torch, dev)
    except Exception as e:  # ImportError, or the JIT build failing
        raise BackendUnavailableError(f"calibrate could not load exllamav2's extension ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); nothing was stored") from None
    done.append("exllamav2_ext")
    a = torch.randn(1024, 1024, dtype=torch.half, device=dev)
    (a @ a).sum().item()
    done.append("cublas")
    if _touch_flash_attn(torch, dev):
        done.append("flash_attn")
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    reserved = int(torch.cuda.memory_reserved(dev))
    used = int(total - free)
    gpu = GpuIdentity(name=torch.cuda.get_device_name(dev), driver=_driver_version(), torch=torch_version())
    return CalibrationRecord(gpu=gpu, overhead_bytes=max(used - reserved, 0), used_bytes=used, reserved_bytes=reserved,
                             total_bytes=int(total), initialised=tuple(done), measured_at=now_text())


def device_count() -> int:
    """Visible CUDA GPUs (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0

"""``exl2opt calibrate``: measure and store this machine's per-GPU overhead (no model, seconds).

See :mod:`optimizer.calibrate_cuda` for what is initialised and measured, and
:mod:`optimizer.calibration` for where the figure is stored and how plan, fit and search pick it up.
"""

from __future__ import annotations

from typing import Optional

import typer

from optimizer.cli import app


@app.command()
def calibrate(
    device: Optional[int] = typer.Option(None, "--device", help="Only this CUDA device index (default: every visible GPU)."),
) -> None:
    """Measure the device memory a run uses beyond torch's allocator (CUDA context, cuBLAS, the exllamav2
    extension, flash-attn) on each GPU and store it; plan, fit and search then charge that figure per GPU."""
    from optimizer.calibrate_cuda import device_count, measure
    from optimizer.calibration import save_record
    from optimizer.errors import BadOptionError

    n = device_count()
    if n == 0:
        measure(device_index=0)  # raises the one-line "needs a CUDA GPU" error
    if device is not None and not 0 <= device < n:
        raise BadOptionError(f"--device {device}: {n} CUDA GPU(s) visible")
    where = None
    for i in [device] if device is not None else range(n):
        rec = measure(device_index=i)
        where = save_record(rec)
        print(f"GPU {i}: {rec.line()}")
    print(f"Stored in {where}; exl2opt plan, fit and search use it on this GPU with this driver and torch.")

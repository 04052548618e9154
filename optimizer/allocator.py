"""PyTorch's CUDA allocator setting for exllamav2 runs, and the fragmentation the VRAM model assumes.

The write-up this project started from ("Insufficient VRAM for model and cache", Smaug-34B 3.0bpw on a
T4) lists ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` among its fixes. exl2opt therefore:

* sets it for its own measurement runs (:func:`apply_for_measurement`) unless the user has set
  ``PYTORCH_CUDA_ALLOC_CONF`` (or its newer name ``PYTORCH_ALLOC_CONF``, torch >= 2.9), and records
  what was used with every measured trial (:meth:`AllocatorSetting.as_record`);
* puts it into every recipe of a PyTorch-based engine (``optimizer.recipes``);
* states the fragmentation its VRAM model assumes with and without it (below).

Fragmentation assumed by the VRAM model (per GPU; ``optimizer.formats.exl2`` refers here):

* **With** ``expandable_segments:True``: none beyond the per-GPU overhead term
  (``DEFAULT_OVERHEAD_BYTES``, which includes allocator slack). An expandable segment maps physical
  2 MiB pages into one growing virtual range, so memory freed after loading or after a forward pass
  is reusable by a later, larger request (the KV cache, SDPA's K/V copies); what stays stranded is
  the page rounding of live blocks.
* **Without** it (torch's default: fixed segments from ``cudaMalloc``): a free block can only serve a
  request that fits inside it, and a segment is returned to the driver only when all of it is free.
  After the load (weights interleaved with temporary buffers) the "reserved but unallocated" memory
  of torch's out-of-memory message can keep the next large request from fitting. The model does not
  charge this; it assumes up to one **largest transient allocation** of the device
  (``DeviceBreakdown.transient``) may be stranded, and :func:`fragmentation_allowance` returns that
  figure so that ``fit`` can print it. This is an assumption, not a measurement: no run on a GPU
  has yet been made to check it (see ``docs/recipes.md``).

llama.cpp does not use PyTorch, so none of this applies to GGUF runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

#: The variable the recipes and the write-up use (still read by torch 2.13 as an alias).
ENV = "PYTORCH_CUDA_ALLOC_CONF"
#: The name torch >= 2.9 reads first.
ENV_NEW = "PYTORCH_ALLOC_CONF"
#: The setting exl2opt uses.
EXPANDABLE = "expandable_segments:True"
#: Backends whose engines allocate through PyTorch's CUDA caching allocator.
TORCH_BACKENDS = frozenset({"exllamav2", "exllamav3"})


@dataclass(frozen=True)
class AllocatorSetting:
    """The allocator configuration of a measurement run.

    Attributes:
        value: the ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` text the run uses.
        source: ``"exl2opt"`` (set by :func:`apply_for_measurement`) or ``"user"`` (already set).
        late: torch's CUDA allocator was already initialised when the setting was applied, so a
            value set by exl2opt may not have taken effect in this process.
    """

    value: str
    source: str
    late: bool = False

    @property
    def expandable(self) -> bool:
        """The run uses expandable segments."""
        return "expandable_segments:true" in self.value.replace(" ", "").lower()

    def as_record(self) -> dict[str, Any]:
        """The fields stored with a trial (JSON-safe)."""
        return {"alloc_conf": self.value, "alloc_conf_source": self.source, "alloc_conf_late": self.late}


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # a torch build without CUDA, or a stand-in module in tests
        return False


def apply_for_measurement(environ: MutableMapping[str, str] | None = None) -> AllocatorSetting:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` in ``environ`` (default ``os.environ``)
    unless the user set ``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF``; return what the run uses.

    Call it before torch initialises CUDA (torch reads the variable once, on first use of the
    allocator); the returned ``late`` says when that was not the case.
    """
    env = os.environ if environ is None else environ
    for name in (ENV_NEW, ENV):
        if env.get(name):
            return AllocatorSetting(value=env[name], source="user")
    env[ENV] = EXPANDABLE
    if environ is None:
        _apply_to_loaded_torch()
    return AllocatorSetting(value=EXPANDABLE, source="exl2opt", late=_cuda_initialised())


def _apply_to_loaded_torch() -> None:
    """torch parses the variable once, on first use of its allocator config (not at import; checked
    on torch 2.13): when torch is already imported, also pass the setting through its runtime setter,
    which changes the parsed config (segments created from then on are expandable)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    setter = getattr(getattr(torch, "_C", None), "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
    if setter is None:
        setter = getattr(getattr(getattr(torch, "cuda", None), "memory", None), "_set_allocator_settings", None)
    if setter is not None:
        with contextlib.suppress(Exception):  # a build without this allocator: the variable stays the record
            setter(EXPANDABLE)


def for_backend(name: str, environ: MutableMapping[str, str] | None = None) -> AllocatorSetting | None:
    """:func:`apply_for_measurement` for a PyTorch backend (by ``Backend.name``), before it opens an
    engine; None for the others (llama.cpp keeps its own CUDA pool)."""
    return apply_for_measurement(environ) if name in TORCH_BACKENDS else None


def fragmentation_allowance(*, transient_bytes: int, expandable: bool = True) -> int:
    """Bytes of one GPU that fragmentation may strand, as the VRAM model assumes (see the module
    docstring): 0 with expandable segments, the device's largest transient allocation without."""
    return 0 if expandable else max(int(transient_bytes), 0)

"""Measurement backends. Heavy imports (torch, exllamav2, llama_cpp) live only in the backend modules.

:func:`backend_for` picks a backend by name, or with ``"auto"`` by the variant's format
(``exl2`` -> ``exllamav2``, ``gguf`` -> ``llamacpp``). Adding an engine is one module with a
``make_backend()`` function returning a :class:`~optimizer.backends.base.Backend`, one line in
:data:`BACKEND_MODULES`, and its name as ``backend`` of the format in ``optimizer.formats.FORMATS``.
"""

from __future__ import annotations

import importlib

from optimizer.backends.base import Backend
from optimizer.errors import BadOptionError
from optimizer.formats import FORMATS
from optimizer.variant import Variant

#: backend name -> module holding ``make_backend()``
BACKEND_MODULES: dict[str, str] = {
    "exllamav2": "optimizer.backends.exllamav2",
    "llamacpp": "optimizer.backends.llamacpp",
    "exllamav3": "optimizer.backends.exllamav3",
}
#: variant format -> default backend name (``FormatSpec.backend`` in the formats registry)
FORMAT_BACKENDS: dict[str, str] = {f.name: f.backend for f in FORMATS.values() if f.backend}
BACKEND_CHOICES = ("auto", *BACKEND_MODULES)


def backend_name_for(*, variant: Variant, name: str = "auto") -> str:
    """The backend name that runs ``variant`` (``name`` "auto" dispatches on ``variant.format``)."""
    if name not in BACKEND_CHOICES:
        raise BadOptionError(f"unknown --backend {name!r} (choose from {', '.join(BACKEND_CHOICES)})")
    if name == "auto":
        try:
            return FORMAT_BACKENDS[variant.format]
        except KeyError:
            raise BadOptionError(f"no backend measures {variant.format} variants") from None
    return name


_CACHE: dict[str, Backend] = {}


def backend_for(*, variant: Variant, name: str = "auto") -> Backend:
    """The (shared) backend instance for ``variant``; imports its module on first use."""
    bname = backend_name_for(variant=variant, name=name)
    if bname not in _CACHE:
        mod = importlib.import_module(BACKEND_MODULES[bname])
        _CACHE[bname] = mod.make_backend()
    be = _CACHE[bname]
    if variant.format not in be.formats:
        raise BadOptionError(f"backend {bname} cannot run {variant.format} variants ({variant.source})")
    return be

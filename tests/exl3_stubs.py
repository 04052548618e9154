"""Test doubles: import stubs that let exllamav3 1.6.5's *Python* code run on a CPU-only machine.

exllamav3 JIT-builds a CUDA extension (``exllamav3_ext``) on import and imports ``triton`` at the
top of two dozen modules. Neither exists here. These stubs (facts: shared reference
``exllamav3-memory.md`` section 6) replace both *before* ``import exllamav3``:

* ``exllamav3_ext`` is a module whose spec looks like a compiled extension (so ``ext.py`` imports it
  instead of compiling). Any attribute is a :class:`StubExtCall`. Calling one raises, except the
  constructors of the per-module C++ objects (``BC_*``) which return an inert object, so that a model
  can be *loaded on CPU* from header-only files and the tensors it keeps can be counted. No kernel
  ever runs: a forward through a stubbed model raises.
* ``triton`` and every ``triton.*`` submodule resolve to a permissive module: ``@triton.jit`` returns
  the function unchanged, everything else is a placeholder.

Everything here is a stand-in for tests; nothing in ``optimizer/`` imports it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from typing import Any


class StubExtCall:
    """Placeholder for one ``exllamav3_ext`` function or class."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.name.startswith("BC_"):
            return _Inert(self.name)
        raise RuntimeError(f"exllamav3_ext.{self.name} called on stub (no CUDA kernels in tests)")

    def __getattr__(self, item: str) -> Any:
        return StubExtCall(f"{self.name}.{item}")


class _Inert:
    """What a stubbed ``BC_*`` constructor returns: holds nothing, and any method call raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, item: str) -> Any:
        return StubExtCall(f"{self._name}.{item}")


class _Permissive:
    """A triton attribute: callable, indexable, decorates by returning the function unchanged."""

    def __init__(self, name: str = "triton") -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # bare decorator (@triton.jit)
        return _Permissive(self._name + "()")  # decorator factory / Config(...) / constexpr(...)

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _Permissive(f"{self._name}.{item}")

    def __getitem__(self, item: Any) -> Any:
        return _Permissive(self._name + "[]")

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (object,)


def _module_getattr(make: Any) -> Any:
    """A PEP 562 ``__getattr__`` that answers every name except dunders (``inspect`` probes ``__file__``)."""

    def getattr_(item: str) -> Any:
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return make(item)

    return getattr_


class _TritonFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``triton`` and ``triton.*`` as permissive modules."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "triton" or fullname.startswith("triton."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> Any:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.__getattr__ = _module_getattr(lambda item: _Permissive(f"{spec.name}.{item}"))  # type: ignore[attr-defined]
        mod.jit = lambda *a, **k: a[0] if a and callable(a[0]) else (lambda f: f)  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module: Any) -> None:
        return None


def install() -> None:
    """Put both stubs in place (idempotent). Must run before ``import exllamav3``."""
    if "exllamav3_ext" not in sys.modules:
        ext = types.ModuleType("exllamav3_ext")
        origin = "/nonexistent/exllamav3_ext" + importlib.machinery.EXTENSION_SUFFIXES[0]
        ext.__spec__ = importlib.machinery.ModuleSpec(
            "exllamav3_ext", importlib.machinery.ExtensionFileLoader("exllamav3_ext", origin), origin=origin
        )
        ext.__file__ = origin
        ext.__getattr__ = _module_getattr(StubExtCall)  # type: ignore[attr-defined]
        sys.modules["exllamav3_ext"] = ext
    if not any(isinstance(f, _TritonFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonFinder())


_HIDDEN: dict[str, Any] = {}


def _hide_triton() -> None:
    """Take the triton stand-in away between exllamav3 calls: other code in the same process (torch,
    exllamav2) probes for triton and must keep seeing that it is absent."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TritonFinder)]
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        _HIDDEN[name] = sys.modules.pop(name)


@contextlib.contextmanager
def active() -> Iterator[None]:
    """The triton stand-in in place for the duration (exllamav3 imports some modules lazily)."""
    install()
    sys.modules.update(_HIDDEN)
    try:
        yield
    finally:
        _hide_triton()


def import_exllamav3() -> Any:
    """``import exllamav3`` (and the submodules the oracle uses) behind the stubs; skips the calling
    test when it is not installed."""
    import pytest

    pytest.importorskip("torch")
    if "exllamav3" in sys.modules:
        return sys.modules["exllamav3"]
    install()
    import torch

    threads = torch.get_num_threads()
    try:
        exl3 = pytest.importorskip("exllamav3")
        import exllamav3.cache
        import exllamav3.conversion.quant_config
        import exllamav3.loader.safetensors  # noqa: F401
        return exl3
    finally:
        _hide_triton()
        torch.set_num_threads(threads)

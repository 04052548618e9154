"""Window-by-window progress of a perplexity measurement, without changing the engine interface.

The caller installs a hook with :func:`on_window`; an engine calls :func:`window_done` after each
scored window. Engines that never call it simply report no per-window progress.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

WindowHook = Callable[[int, int], None]
_HOOK: ContextVar[WindowHook | None] = ContextVar("exl2opt_window_hook", default=None)


@contextlib.contextmanager
def on_window(hook: WindowHook) -> Iterator[None]:
    """Call ``hook(done, total)`` (windows) while the block runs."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def window_done(done: int, total: int) -> None:
    """An engine scored ``done`` of ``total`` perplexity windows."""
    hook = _HOOK.get()
    if hook is not None:
        hook(done, total)

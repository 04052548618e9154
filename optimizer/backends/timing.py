"""The timed part of a speed measurement, shared by every engine: prompt then generation, run after run.

What a run feeds in is the engine's business (:mod:`optimizer.backends.torch_measure` for the PyTorch
engines, ``LlamaCppEngine.speed`` for llama.cpp); this module only clocks it and hands the seconds to
:meth:`~optimizer.backends.base.SpeedResult.of_runs` (medians, every run kept). Times are wall-clock
seconds (``time.perf_counter``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from optimizer.backends.base import SpeedProtocol, SpeedResult


def _nothing() -> None:
    return None


def timed_runs(*, protocol: SpeedProtocol, context_fill: int, reset: Callable[[], None], prompt: Callable[[], None],
               generate: Callable[[], None], sync: Callable[[], None] = _nothing) -> SpeedResult:
    """``max(1, protocol.repeats)`` runs of: ``reset()`` (empty the cache), ``prompt()`` (write
    ``context_fill`` tokens), ``generate()`` (``protocol.gen_tokens`` tokens on top). Each timing starts
    after ``sync()`` and ends with it (``sync`` waits for the devices; a no-op when the engine's calls
    return only once the work is done). Warm-up passes are the caller's, before this."""
    prompt_s, gen_s = [], []
    for _ in range(max(1, protocol.repeats)):
        reset()
        sync()
        t0 = time.perf_counter()
        prompt()
        sync()
        prompt_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate()
        sync()
        gen_s.append(time.perf_counter() - t0)
    return SpeedResult.of_runs(prompt_s=prompt_s, gen_s=gen_s, context_fill=context_fill,
                               gen_tokens=protocol.gen_tokens)

"""The measurement loops of the PyTorch engines (exllamav2, exllamav3), written once over :class:`Forward`.

An engine describes how token ids go through its loaded model and cache (a :class:`Forward`); the loops
here do the rest identically for every such engine:

* :func:`perplexity` — windows per :class:`~optimizer.backends.base.EvalProtocol` (fitted to the
  cache), BOS replacing a window's first token, ``prefill`` tokens written unscored, then
  ``score_chunk`` chunks through the cache, every next-token prediction inside the window scored
  (log-softmax in FP32), a progress tick per window (:func:`~optimizer.backends.progress.window_done`);
* :func:`speed` — seeded random ids fill the cache to ``context_fill`` (prompt tokens/s), then
  ``gen_tokens`` greedy single-token forwards (argmax on CPU per token), after ``warmup`` untimed
  passes, timed by :func:`~optimizer.backends.timing.timed_runs` between device synchronisations;
* :func:`check_causality` — :func:`~optimizer.backends.causality.check_causal` through the cache.

No heavy import at module level: ``Forward.torch`` is the engine's own torch module. Lengths are tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.backends.base import EvalProtocol, SpeedProtocol, SpeedResult
from optimizer.backends.causality import CausalityResult, check_causal
from optimizer.backends.progress import window_done
from optimizer.backends.timing import timed_runs
from optimizer.errors import EngineError

#: prompt tokens of a warm-up pass (at most; fewer when the fill is shorter)
WARMUP_TOKENS = 256


@dataclass(frozen=True)
class Forward:
    """How one engine feeds token ids through its loaded model and cache.

    Ids are ``(1, n)`` long tensors on the CPU; ``past`` is how many tokens the cache holds before
    them (their first position).

    ``context``: usable cache length (tokens). ``vocab_size``: random ids for speed are below it.
    ``reset()``: empty the cache (engines that are told ``past`` on every call may do nothing).
    ``prefill(ids, past)``: write ``ids`` into the cache, no logits wanted.
    ``logits(ids, past)``: run ``ids`` through the cache (writing them) and return ``(1, n, V)`` logits,
    any float dtype; columns beyond the real vocabulary must be cut off or hold -65504 (0 after softmax).
    ``sync()``: wait for every device the model uses.
    """

    torch: Any
    context: int
    vocab_size: int
    reset: Callable[[], None]
    prefill: Callable[[Any, int], None]
    logits: Callable[[Any, int], Any]
    sync: Callable[[], None]


def perplexity(fwd: Forward, *, tokens: Sequence[int], protocol: EvalProtocol, bos: int | None) -> float:
    """exp(mean negative log-likelihood) over the scored tokens of ``protocol`` (see the module docstring).

    ``bos``: the token id that replaces a window's first token when ``protocol.add_bos`` (None: none).
    Raises :class:`EngineError` when the protocol scores nothing or the text is shorter than one window."""
    torch = fwd.torch
    p = protocol.fitted(fwd.context)
    window, prefill = p.window, p.prefill
    if prefill >= window - 1:
        raise EngineError(f"nothing to score: prefill {prefill} leaves no scored token in a {window}-token window")
    n = min(p.n_windows, len(tokens) // window)
    if n < 1:
        raise EngineError(f"evaluation text too short: {len(tokens)} tokens for one {window}-token window")
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n):
            ids = list(tokens[i * window:(i + 1) * window])
            if p.add_bos and bos is not None:
                ids[0] = int(bos)
            t = torch.tensor([ids], dtype=torch.long)
            fwd.reset()
            if prefill > 0:
                fwd.prefill(t[:, :prefill], 0)
            pos = prefill
            while pos < window:
                end = min(pos + p.score_chunk, window)
                logits = fwd.logits(t[:, pos:end], pos).float()
                targets = t[:, pos + 1:end + 1].to(logits.device)
                lp = torch.log_softmax(logits[:, :targets.shape[1]], dim=-1)
                nll -= float(lp.gather(-1, targets.unsqueeze(-1)).sum())
                count += int(targets.numel())
                pos = end
            window_done(i + 1, n)
    return math.exp(nll / count)


def speed(fwd: Forward, *, protocol: SpeedProtocol) -> SpeedResult:
    """Prompt and generation throughput (tokens/s, medians over ``protocol.repeats`` runs) at
    ``context_fill`` tokens, clamped to the cache minus ``gen_tokens``."""
    torch = fwd.torch
    fill = max(min(protocol.context_fill, fwd.context - protocol.gen_tokens), 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fwd.vocab_size, (1, fill), generator=g, dtype=torch.long)
    warm = min(fill, WARMUP_TOKENS)

    def prompt() -> None:
        fwd.prefill(ids, 0)

    def generate() -> None:
        tok = ids[:, -1:]
        for k in range(protocol.gen_tokens):
            logits = fwd.logits(tok, fill + k)
            tok = logits[:, -1, :].argmax(dim=-1, keepdim=True).cpu()

    with torch.inference_mode():
        for _ in range(protocol.warmup):
            fwd.reset()
            fwd.prefill(ids[:, :warm], 0)
            fwd.logits(ids[:, -1:], warm)
        return timed_runs(protocol=protocol, context_fill=fill, reset=fwd.reset, prompt=prompt, generate=generate,
                          sync=fwd.sync)


def check_causality(fwd: Forward) -> CausalityResult:
    """:func:`~optimizer.backends.causality.check_causal` with logits read through the cache (a prompt,
    then a chunk after a prefill, the two shapes :func:`perplexity` uses); the cache is left empty."""
    torch = fwd.torch

    def logits_of(ids: Sequence[int], past: int) -> Any:
        t = torch.tensor([list(ids)], dtype=torch.long)
        fwd.reset()
        if past:
            fwd.prefill(t[:, :past], 0)
        return fwd.logits(t[:, past:], past)[0].float().cpu()

    with torch.inference_mode():
        res = check_causal(logits_of=logits_of, vocab_size=fwd.vocab_size, context=fwd.context)
    fwd.reset()
    return res

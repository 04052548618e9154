"""A cheap self-check that a loaded model attends causally, run before its first perplexity.

Why: exllamav2 0.3.2's torch SDPA branch (used when neither flash-attn nor xformers is available)
passes no mask for causal prompt attention, so every position sees the tokens after it and
perplexity comes out too low (docs/causality.md). The backend routes such setups to the matmul
path (``config.no_sdpa``); this check proves, on the loaded model, that it worked.

The check: a short sequence of token ids goes through the model twice, the second time with one
token changed. Causal attention leaves the logits of every earlier position unchanged (up to
``TOLERANCE``), and the changed position's logits must change (so the check can see a change at
all). It runs twice: with no past (a prompt) and after a prefill in the cache (a scored chunk),
the two shapes perplexity uses. The engine supplies ``logits_of(ids, past)``: the logits of
``ids[past:]`` after ``ids[:past]`` was written to the cache.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: Largest |logit change| (absolute, in logit units) allowed at positions before the changed token.
#: FP16 logits of size ~16 have a resolution of 0.016; non-causal attention moves them by O(1).
TOLERANCE = 0.05
#: Tokens per check sequence (half prefilled in the second run).
CHECK_TOKENS = 16


@dataclass(frozen=True)
class CausalityResult:
    """Outcome of :func:`check_causal`. Changes are max |logit difference| (logit units)."""

    passed: bool
    max_change_before: float  #: worst change at positions before the changed token (should be ~0)
    change_at: float  #: smallest change at the changed position over the runs (must be > TOLERANCE)
    tolerance: float = TOLERANCE

    def line(self) -> str:
        """One line for logs and reports."""
        verdict = "causal" if self.passed else "NOT causal"
        return (f"causality check: {verdict} (max logit change before the changed token {self.max_change_before:.4g}, "
                f"at it {self.change_at:.4g}, tolerance {self.tolerance:g})")


def check_causal(*, logits_of: Callable[[Sequence[int], int], Any], vocab_size: int, context: int,
                 seed: int = 1234) -> CausalityResult:
    """Run the check with ``logits_of(ids, past) -> (len(ids) - past, vocab)`` float tensor.

    ``context`` is the cache length in tokens; the sequence is ``min(CHECK_TOKENS, context)`` long.
    """
    n = min(CHECK_TOKENS, context)
    if n < 4:
        raise ValueError(f"a causality check needs a cache of at least 4 tokens, got {context}")
    rng = random.Random(seed)
    ids = [rng.randrange(vocab_size) for _ in range(n)]
    worst_before, least_at = 0.0, float("inf")
    for past in (0, n // 2):
        k = past + (n - past) // 2  # the changed token, inside the scored part
        other = list(ids)
        other[k] = (ids[k] + 1 + rng.randrange(vocab_size - 1)) % vocab_size
        a, b = logits_of(ids, past), logits_of(other, past)
        diff = (a.float() - b.float()).abs()
        j = k - past
        if j > 0:
            worst_before = max(worst_before, float(diff[:j].max()))
        least_at = min(least_at, float(diff[j].max()))
    passed = worst_before <= TOLERANCE < least_at
    return CausalityResult(passed=passed, max_change_before=worst_before, change_at=least_at)

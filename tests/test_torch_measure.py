"""The shared measurement loops (optimizer.backends.torch_measure, optimizer.backends.timing) against a
small CPU test double of an engine: a Forward whose logits depend on every token before them, through a
cache that checks each call's position. The perplexity is compared with one computed over the whole
window at once, so a wrong chunk boundary, target, BOS, reset or ``past`` shows up as a different number."""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from optimizer.backends import timing, torch_measure  # noqa: E402
from optimizer.backends.base import EvalProtocol, SpeedProtocol  # noqa: E402
from optimizer.backends.progress import on_window  # noqa: E402

VOCAB, STATES = 50, 97


class FakeForward:
    """A cache of token ids; the logits of a position are a fixed random row chosen by its whole prefix."""

    def __init__(self, *, context: int, causal: bool = True, seed: int = 0) -> None:
        self.table = torch.randn(STATES, VOCAB, generator=torch.Generator().manual_seed(seed))
        self.context, self.causal = context, causal
        self.cache: list[int] = []
        self.calls: list[tuple[Any, ...]] = []

    def row(self, prefix: list[int]) -> Any:
        return self.table[(sum(prefix) * 31 + len(prefix)) % STATES]

    def reset(self) -> None:
        self.calls.append(("reset",))
        self.cache.clear()

    def _write(self, ids: Any, past: int) -> list[int]:
        assert ids.dtype == torch.long and ids.shape[0] == 1
        assert past == len(self.cache), f"past {past} but the cache holds {len(self.cache)}"
        new = [int(x) for x in ids[0]]
        self.cache += new
        assert len(self.cache) <= self.context, "write past the cache"
        return new

    def prefill(self, ids: Any, past: int) -> None:
        self.calls.append(("prefill", ids.shape[1], past))
        self._write(ids, past)

    def logits(self, ids: Any, past: int) -> Any:
        self.calls.append(("logits", ids.shape[1], past, [int(x) for x in ids[0]]))
        new = self._write(ids, past)
        if self.causal:
            rows = [self.row(self.cache[:past + j + 1]) for j in range(len(new))]
        else:  # every position sees the whole chunk
            rows = [self.row(self.cache[:past + len(new)] + [j]) for j in range(len(new))]
        return torch.stack(rows)[None].half()

    def sync(self) -> None:
        self.calls.append(("sync",))

    def forward(self) -> torch_measure.Forward:
        return torch_measure.Forward(torch=torch, context=self.context, vocab_size=VOCAB, reset=self.reset,
                                     prefill=self.prefill, logits=self.logits, sync=self.sync)


def reference_ppl(fake: FakeForward, tokens: list[int], *, window: int, prefill: int, n: int, bos: int | None) -> float:
    """Whole-window scoring: position j (prefill <= j < window - 1) predicts token j + 1."""
    nll, count = 0.0, 0
    for i in range(n):
        ids = tokens[i * window:(i + 1) * window]
        if bos is not None:
            ids = [bos, *ids[1:]]
        for j in range(prefill, window - 1):
            lp = torch.log_softmax(fake.row(ids[:j + 1]).half().float(), dim=-1)
            nll -= float(lp[ids[j + 1]])
            count += 1
    return math.exp(nll / count)


TOKENS = [(7 * i * i + 3 * i) % VOCAB for i in range(1000)]


@pytest.mark.parametrize("bos", [None, 1])
def test_perplexity_equals_whole_window_scoring(bos: int | None) -> None:
    fake = FakeForward(context=256)
    proto = EvalProtocol(window=128, n_windows=3, prefill=40, score_chunk=25, add_bos=bos is not None)
    seen: list[tuple[int, int]] = []
    with on_window(lambda done, total: seen.append((done, total))):
        got = torch_measure.perplexity(fake.forward(), tokens=TOKENS, protocol=proto, bos=bos)
    want = reference_ppl(fake, TOKENS, window=128, prefill=40, n=3, bos=bos)
    assert got == pytest.approx(want, rel=1e-6)  # float32 sums in another order
    assert seen == [(1, 3), (2, 3), (3, 3)]
    # per window: a reset, the prefill, then chunks of 25 (the last one shorter) at their positions
    first = fake.calls[:fake.calls.index(("reset",), 1)]
    assert [c[:3] for c in first] == [("reset",), ("prefill", 40, 0), ("logits", 25, 40), ("logits", 25, 65),
                                      ("logits", 25, 90), ("logits", 13, 115)]


def test_perplexity_window_shrinks_to_the_cache() -> None:
    fake = FakeForward(context=64)
    proto = EvalProtocol(window=128, n_windows=2, prefill=40, score_chunk=16, add_bos=False)
    got = torch_measure.perplexity(fake.forward(), tokens=TOKENS, protocol=proto, bos=None)
    want = reference_ppl(fake, TOKENS, window=64, prefill=32, n=2, bos=None)
    assert got == pytest.approx(want, rel=1e-6)  # float32 sums in another order


def test_perplexity_refuses_protocols_that_score_nothing_or_texts_too_short() -> None:
    from optimizer.errors import EngineError

    fwd = FakeForward(context=256).forward()
    with pytest.raises(EngineError, match="nothing to score"):
        torch_measure.perplexity(fwd, tokens=TOKENS, protocol=EvalProtocol(window=64, prefill=63), bos=None)
    with pytest.raises(EngineError, match="too short"):
        torch_measure.perplexity(fwd, tokens=TOKENS[:100], protocol=EvalProtocol(window=128, prefill=8), bos=None)


def test_speed_fills_then_generates_greedily_between_syncs() -> None:
    fake = FakeForward(context=64)
    res = torch_measure.speed(fake.forward(), protocol=SpeedProtocol(context_fill=100, gen_tokens=5, warmup=1, repeats=2))
    fill = 64 - 5
    assert res.context_fill == fill and len(res.prompt_tok_s_runs) == len(res.gen_tok_s_runs) == 2
    kinds = [c[:3] for c in fake.calls]
    assert kinds[:3] == [("reset",), ("prefill", fill, 0), ("logits", 1, fill)]  # warm-up (fill < 256 tokens)
    run = [("reset",), ("sync",), ("prefill", fill, 0), ("sync",),
           *[("logits", 1, fill + k) for k in range(5)], ("sync",)]
    assert kinds[3:] == run + run
    gen = [c for c in fake.calls[3:3 + len(run)] if c[0] == "logits"]
    for prev, nxt in zip(gen[:-1], gen[1:], strict=True):  # each generated token is the argmax of the previous logits
        prefix = fake.cache[:prev[2] + 1]
        assert nxt[3] == [int(fake.row(prefix).half().argmax())]


def test_causality_check_through_the_forward() -> None:
    assert torch_measure.check_causality(FakeForward(context=64).forward()).passed
    fake = FakeForward(context=64, causal=False)
    assert not torch_measure.check_causality(fake.forward()).passed
    assert fake.calls[-1] == ("reset",) and fake.cache == []


def test_timed_runs_clock_prompt_and_generation_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    events: list[str] = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def step(name: str, seconds: float) -> Any:
        def fn() -> None:
            events.append(name)
            clock[0] += seconds
        return fn

    res = timing.timed_runs(protocol=SpeedProtocol(gen_tokens=10, repeats=3), context_fill=400,
                            reset=step("reset", 100.0), prompt=step("prompt", 2.0), generate=step("gen", 0.5),
                            sync=step("sync", 0.0))
    assert res.prompt_tok_s == 200.0 and res.gen_tok_s == 20.0  # reset time is not counted
    assert res.prompt_tok_s_runs == (200.0,) * 3
    assert events == ["reset", "sync", "prompt", "sync", "gen", "sync"] * 3

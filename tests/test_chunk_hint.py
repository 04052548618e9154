"""``fit`` also tries a smaller prompt chunk and says how much more context it holds (``space.smaller_chunk_gains``)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.formats import RuntimeOptions
from optimizer.sources.local import discover_local
from optimizer.space import SMALL_CHUNK, Budget, max_context, smaller_chunk_gains
from optimizer.vram import GIB, Split

EXAMPLE = Path(__file__).resolve().parents[1] / "studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2"


def _fits(runtime: RuntimeOptions, budget: Budget):
    v = discover_local(EXAMPLE)[0]
    return [max_context(variant=v, cache=c, split=Split(), budget=budget, runtime=runtime) for c in ("fp16", "q4")]


def test_gain_is_the_max_context_at_the_small_chunk() -> None:
    budget = Budget(per_device=(15 * GIB,))
    runtime = RuntimeOptions(chunk_len=2048)
    gains = smaller_chunk_gains(fits=_fits(runtime, budget), budget=budget, runtime=runtime)
    assert [a.cache for a, _ in gains] == ["fp16", "q4"]
    small = _fits(RuntimeOptions(chunk_len=SMALL_CHUNK), budget)
    for (asked, got), direct in zip(gains, small, strict=True):
        assert got.max_seq_len == direct.max_seq_len
        assert (got.max_seq_len or 0) > (asked.max_seq_len or 0)


def test_no_gain_when_the_chunk_is_already_small_or_flash_attn_removes_the_term() -> None:
    budget = Budget(per_device=(15 * GIB,))
    small = RuntimeOptions(chunk_len=SMALL_CHUNK)
    assert smaller_chunk_gains(fits=_fits(small, budget), budget=budget, runtime=small) == []
    # a budget so large that both reach the model's default context: nothing to gain
    huge = Budget(per_device=(400 * GIB,))
    big = RuntimeOptions(chunk_len=2048)
    assert smaller_chunk_gains(fits=_fits(big, huge), budget=huge, runtime=big) == []


def test_fit_prints_the_hint_only_when_it_helps() -> None:
    r = CliRunner().invoke(app, ["fit", "--model", str(EXAMPLE), "--vram", "15GiB", "--recipe", "tabby"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("  3.0bpw-h6: fp16 "))
    assert "(now 1024)" in line and "q4 " in line
    assert f"with --chunk {SMALL_CHUNK}" in r.output
    r = CliRunner().invoke(app, ["fit", "--model", str(EXAMPLE), "--vram", "15GiB", "--recipe", "tabby",
                                 "--chunk", str(SMALL_CHUNK)])
    assert r.exit_code == 0, r.output
    assert "A smaller prompt chunk" not in r.output

"""Progress a person can follow: perplexity window by window, and an ETA from the phase timings so far."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gguf_util import llama_cpp_available, write_tiny_gguf
from test_report import make_fake_study

from optimizer.backends.progress import on_window, window_done
from optimizer.study.eta import PhaseTimes, describe_eta, eta_seconds, work_left


class RecordingProgress:
    """Stands in for rich's Progress: keeps every description it is given (test double)."""

    def __init__(self) -> None:
        self.descriptions: list[str] = []

    def add_task(self, description: str, total: int) -> int:
        return 0

    def update(self, task: int, description: str) -> None:
        self.descriptions.append(description)

    def advance(self, task: int) -> None:
        pass


def test_window_hook_reaches_the_caller_and_only_inside_the_block() -> None:
    seen: list[tuple[int, int]] = []
    window_done(1, 2)  # no hook: nothing happens
    with on_window(lambda d, n: seen.append((d, n))):
        window_done(1, 3)
        window_done(2, 3)
    window_done(3, 3)
    assert seen == [(1, 3), (2, 3)]


def test_eta_from_phase_timings() -> None:
    t = PhaseTimes()
    work = {"load": 2, "cache": 5, "perplexity": 3, "speed": 4}
    assert eta_seconds(t, work) is None and describe_eta(None) == "ETA after the first measurements"
    for phase, s in (("load", 10.0), ("load", 30.0), ("perplexity", 4.0), ("speed", 2.0)):
        t.add(phase, s)
    # no cache rebuild timed yet: it counts as nothing next to loads
    assert eta_seconds(t, work) == pytest.approx(2 * 20.0 + 3 * 4.0 + 4 * 2.0)
    t.add("cache", 0.5)
    assert eta_seconds(t, work) == pytest.approx(60.0 + 5 * 0.5)
    assert eta_seconds(t, {"load": 0, "cache": 0, "perplexity": 0, "speed": 0}) == 0.0
    assert describe_eta(62.5) == "ETA 1 min 02 s" and describe_eta(3725) == "ETA 1 h 02 min" and describe_eta(9) == "ETA 9 s"


def test_work_left_counts_loads_and_memoized_measurements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer.study import build_space
    from optimizer.study.eta import ppl_key_of, speed_key_of

    _, spec = make_fake_study(tmp_path, monkeypatch)
    todo = [c for c in build_space(spec) if c.verdict.fits]
    models = {(c.config.variant.key, c.config.split.label) for c in todo}
    ppl = {ppl_key_of(c, spec, "fake") for c in todo}
    speed = {speed_key_of(c, spec) for c in todo}
    w = work_left(todo, spec=spec, ppl_done=set(), speed_done=set(), dataset_id="fake", loaded=None)
    assert w == {"load": len(models), "cache": len(todo) - len(models), "perplexity": len(ppl), "speed": len(speed)}
    first = todo[0]
    loaded = (first.config.variant.key, first.config.split.label)
    w2 = work_left(todo, spec=spec, ppl_done={ppl_key_of(first, spec, "fake")}, speed_done={speed_key_of(first, spec)},
                   dataset_id="fake", loaded=loaded)
    assert w2 == {"load": len(models) - 1, "cache": len(todo) - len(models) + 1, "perplexity": len(ppl) - 1, "speed": len(speed) - 1}


def test_search_progress_shows_phases_and_an_eta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fake_engine import FakeBackend

    from optimizer.evaldata import EvalText
    from optimizer.study import run

    _, spec = make_fake_study(tmp_path / "first", monkeypatch)  # for the spec only
    prog: Any = RecordingProgress()
    run(spec=spec, study_name="p", backend_factory=lambda v: FakeBackend(), root=tmp_path / "studies",
        eval_text=lambda: EvalText(dataset_id="fake", text="abc " * 100), sampler="bruteforce", progress=prog)
    d = prog.descriptions
    assert any(x.endswith(": loading") for x in d)  # before anything was timed: no ETA yet
    assert any(": perplexity" in x for x in d) and any("speed (3 timed runs)" in x for x in d)
    etas = [x for x in d if " left, ETA " in x]
    assert etas and "ETA after the first measurements" not in etas[-1]
    assert not d[-1].count(" left")  # the last measurement leaves nothing


@pytest.mark.llamacpp
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_llamacpp_reports_every_perplexity_window(tmp_path: Path) -> None:
    from optimizer.backends.base import EvalProtocol, LoadSpec
    from optimizer.backends.llamacpp import LlamaCppEngine
    from optimizer.sources.local import discover_local
    from optimizer.vram import Split

    write_tiny_gguf(tmp_path / "tiny-F16.gguf")
    (v,) = discover_local(tmp_path / "tiny-F16.gguf")
    eng = LlamaCppEngine(n_threads=1)
    try:
        eng.prepare(LoadSpec(variant=v, split=Split(), max_seq_len=256, cache="f16"))
        toks = eng.tokenize("the quick brown fox jumps over the lazy dog " * 40)
        seen: list[tuple[int, int]] = []
        with on_window(lambda d, n: seen.append((d, n))):
            eng.perplexity(tokens=toks, protocol=EvalProtocol(window=64, n_windows=3, prefill=32, score_chunk=16))
    finally:
        eng.close()
    assert seen == [(1, 3), (2, 3), (3, 3)]

"""pareto.csv and the terminal recommendation carry the run recipes of every front row."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from fake_engine import FakeBackend

from optimizer.allocator import ENV, EXPANDABLE
from optimizer.backends.base import EvalProtocol, SpeedProtocol
from optimizer.evaldata import EvalText
from optimizer.report import recommendation, write_reports
from optimizer.sources.local import discover_local
from optimizer.space import Budget
from optimizer.study import SearchSpec, open_study, run
from optimizer.units import parse_size
from optimizer.vram import Split

yaml = pytest.importorskip("yaml")
FLAG = {"fp16": [], "fp8": ["-c8"], "q8": ["-cq8"], "q6": ["-cq6"], "q4": ["-cq4"]}


@pytest.mark.parametrize("split", [Split(), Split(mode="manual", gpu_split=(1.0, 1.0))], ids=["1gpu", "manual"])
def test_pareto_csv_carries_a_run_command_and_a_tabby_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             split: Split) -> None:
    monkeypatch.setenv(ENV, EXPANDABLE)  # keep the process environment as it was
    d = tmp_path / "models"
    for b in (3.0, 5.0):
        make_exl2_dir(d, f"tiny-{b}bpw", TINY_LLAMA, bits=b)
    spec = SearchSpec(
        variants=tuple(discover_local(d)), budget=Budget(per_device=(parse_size("2GiB"),), overhead=(0,)),
        split=split, contexts=(1024, 4096), caches=("fp16", "q4", "fp8"),
        eval_protocol=EvalProtocol(window=64, n_windows=2, prefill=32, score_chunk=16),
        speed_protocol=SpeedProtocol(context_fill=512, gen_tokens=16),
    )
    run(spec=spec, study_name="r", backend_factory=lambda v: FakeBackend(name="exllamav2"),
        eval_text=lambda: EvalText(dataset_id="fake:1", text="hello world " * 50), root=tmp_path / "studies")
    study = open_study(study_name="r", root=tmp_path / "studies")
    files, front = write_reports(study=study, out_dir=tmp_path / "out", plots=False)
    rows = list(csv.DictReader(files.pareto_csv.open()))
    assert rows and len(rows) == len(front)
    for r in rows:
        words = shlex.split(r["run_command"])
        assert words[:3] == [f"{ENV}={EXPANDABLE}", "python", "examples/chat.py"]
        assert Path(words[words.index("-m") + 1]).name == f"tiny-{float(r['bpw'])}bpw"
        assert words[words.index("-l") + 1] == r["max_seq_len"]
        assert all(f in words for f in FLAG[r["cache_mode"]])
        assert ("-gs" in words) == (split.mode == "manual")
        if r["cache_mode"] == "fp8":
            assert r["tabby_config"] == ""  # TabbyAPI has no FP8 cache: no block rather than a wrong one
        else:
            m = yaml.safe_load(r["tabby_config"])["model"]
            assert m["max_seq_len"] == int(r["max_seq_len"]) and m["cache_mode"] == r["cache_mode"].upper()
            assert m.get("gpu_split") == ([1, 1] if split.mode == "manual" else None)
    trials = list(csv.DictReader(files.trials_csv.open()))
    assert {t["alloc_conf"] for t in trials if t["status"] == "measured"} == {EXPANDABLE}
    assert "run it:" in recommendation(front)
    from optimizer.report.page import page_data
    from optimizer.report.rows import configurations, trial_rows

    all_rows = trial_rows(study)
    data = page_data(study=study, configs=configurations(all_rows), front=front, all_rows=all_rows)
    runs = {c["key"]: c["run"] for c in data["configs"]}
    assert {runs[k] for k in data["front"]} == {r["run_command"] for r in rows}  # the page's hover and pick
    assert all(v == "" for k, v in runs.items() if k not in data["front"])

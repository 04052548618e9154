"""Reports: pareto.csv / trials.csv rows and columns, plots, no token, `exl2opt report` from storage alone."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from fake_engine import FakeBackend, fake_ppl, fake_speed

from optimizer.backends.base import EvalProtocol, SpeedProtocol
from optimizer.evaldata import EvalText
from optimizer.formats import RuntimeOptions
from optimizer.report import PARETO_COLUMNS, TRIAL_COLUMNS, recommendation, scrub, write_reports
from optimizer.sources.local import discover_local
from optimizer.space import Budget
from optimizer.study import SearchSpec, build_space, open_study, run
from optimizer.units import parse_size
from optimizer.variant import Location
from optimizer.vram import Split

FAKE_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz123456"
CFG = dict(TINY_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=16384)


@pytest.fixture()
def study_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, SearchSpec]:
    return make_fake_study(tmp_path, monkeypatch)


def make_fake_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, SearchSpec]:
    """Study "r" under tmp_path/studies: three exl2 variants x 3 contexts x 2 caches under 0.7 GiB,
    measured by the fake engine, q4 at 8192 failing with an OOM."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("FAKE_ENGINE_OOM", "q4@8192")
    for b in (3.0, 4.0, 8.0):
        make_exl2_dir(tmp_path / "m", f"tiny-{b}bpw", CFG, bits=b)
    vs = []
    for v in discover_local(tmp_path / "m"):
        rev = f"{v.bits}bpw"
        vs.append(dataclasses.replace(v, location=Location(kind="hub", repo_id="org/Tiny-exl2", revision=rev)))
    spec = SearchSpec(
        variants=tuple(vs), budget=Budget(per_device=(parse_size("0.7GiB"),), overhead=(0,)), split=Split(),
        contexts=(2048, 8192, 16384), caches=("fp16", "q4"),
        eval_protocol=EvalProtocol(window=64, n_windows=1, prefill=32, score_chunk=16),
        speed_protocol=SpeedProtocol(context_fill=1024, gen_tokens=16),
        runtime=RuntimeOptions(flash_attn=True),  # no chunk^2 attention scores in the 0.7 GiB budget
    )
    run(spec=spec, study_name="r", backend_factory=lambda v: FakeBackend(), root=tmp_path / "studies",
        eval_text=lambda: EvalText(dataset_id="fake", text="abc " * 100), sampler="bruteforce")
    return tmp_path / "studies", spec


def page_json(page: str) -> dict:
    """The JSON document embedded in report.html."""
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))


def _read(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_reports_rows_and_columns(study_root: tuple[Path, SearchSpec], tmp_path: Path) -> None:
    root, spec = study_root
    study = open_study(study_name="r", storage_url=None, root=root, create=False)
    files, front = write_reports(study=study, out_dir=tmp_path / "out")
    trials = _read(files.trials_csv)
    assert list(trials[0]) == list(TRIAL_COLUMNS)
    assert len(trials) == len(study.trials)
    cands = build_space(spec)
    statuses = {r["config_key"]: r for r in trials}
    for c in cands:
        r = statuses[c.key]
        if not c.verdict.fits:
            assert r["status"] == "infeasible" and r["reason"] and float(r["vram_excess_gib"]) > 0
    failed = [r for r in trials if r["state"] == "FAIL"]
    assert failed and all(r["reason"] == "oom" and r["cache_mode"] == "q4" and r["max_seq_len"] == "8192" for r in failed)
    pareto = _read(files.pareto_csv)
    assert list(pareto[0]) == list(PARETO_COLUMNS)
    # the front equals the brute-force front of what was measured (feasible, not OOM)
    pts = {}
    for c in cands:
        if c.verdict.fits and not (c.config.cache == "q4" and c.config.max_seq_len == 8192):
            fill = min(1024, c.config.max_seq_len - 16)
            pts[(c.config.variant.label, c.config.cache, c.config.max_seq_len)] = (
                fake_ppl(c.config.variant, c.config.cache), fake_speed(c.config.variant, c.config.cache, "1gpu", fill)[1],
                c.config.max_seq_len)
    truth = {k for k, p in pts.items()
             if not any(q[0] <= p[0] and q[1] >= p[1] and q[2] >= p[2] and q != p for q in pts.values())}
    assert {(r["label"], r["cache_mode"], int(r["max_seq_len"])) for r in pareto} == truth
    for r in pareto:
        assert r["variant"].startswith("org/Tiny-exl2@") and r["download"].startswith("hf download org/Tiny-exl2")
        assert float(r["predicted_vram_gib"]) <= 0.7 and r["measured_vram_gib"]
    assert files.png and files.png.stat().st_size > 1000 and files.png.read_bytes()[:4] == b"\x89PNG"
    assert files.html and files.html.name == "report.html"
    page = files.html.read_text()
    # one self-contained file: no external script, style, image or font, and small
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I) and "@import" not in page
    assert len(page) < 300_000
    data = page_json(page)
    assert len(data["configs"]) == len({r["config_key"] for r in trials})
    assert data["front"] == [r["config_key"] for r in front]
    for f in (files.pareto_csv, files.trials_csv, files.html):
        assert FAKE_TOKEN not in f.read_text()
    assert "balanced" in recommendation(front)


def test_report_command_from_storage_alone(study_root: tuple[Path, SearchSpec], capsys: pytest.CaptureFixture[str]) -> None:
    from optimizer.cli import main

    root, _ = study_root
    main(["report", "r", "--studies-dir", str(root), "--no-plots"])
    out = capsys.readouterr().out
    assert "Pareto front" in out and (root / "r" / "pareto.csv").is_file()
    lines = out.splitlines()  # the recommendation is lines of text, not one line with escaped newlines
    assert "\\x0a" not in out and any(ln.startswith("best quality:") for ln in lines) and any(ln.startswith("balanced:") for ln in lines)
    with pytest.raises(SystemExit) as ei:
        main(["report", "nope", "--studies-dir", str(root)])
    assert ei.value.code == 1
    assert "no study 'nope'" in capsys.readouterr().err


def test_scrub_removes_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secretvalue123")
    assert "hf_" + "x" * 30 not in scrub("token hf_" + "x" * 30)
    assert "secretvalue123" not in scrub("a secretvalue123 b")


def test_recommendation_when_nothing_fits() -> None:
    assert "No measured configuration" in recommendation([])


def test_one_front_across_formats_has_a_format_column_and_a_comparison(tmp_path: Path) -> None:
    """An exl2 source and a GGUF source in one study: rows carry `format`, the report compares them."""
    from gguf_util import write_tiny_gguf

    make_exl2_dir(tmp_path / "exl2", "tiny-4.0bpw", CFG, bits=4.0)
    (tmp_path / "gguf").mkdir()
    write_tiny_gguf(tmp_path / "gguf" / "tiny-F16.gguf")
    variants = tuple(discover_local(tmp_path / "exl2") + discover_local(tmp_path / "gguf"))
    assert {v.format for v in variants} == {"exl2", "gguf"}
    spec = SearchSpec(
        variants=variants, budget=Budget(per_device=(parse_size("2GiB"),), overhead=(0,)), split=Split(),
        contexts=(512, 1024), caches=("fp16", "q4", "f16", "q8_0"),
        eval_protocol=EvalProtocol(window=64, n_windows=1, prefill=32, score_chunk=16),
        speed_protocol=SpeedProtocol(context_fill=256, gen_tokens=16), min_ctx=0,
    )
    run(spec=spec, study_name="x", backend_factory=lambda v: FakeBackend(), root=tmp_path / "studies",
        eval_text=lambda: EvalText(dataset_id="fake", text="abc " * 100), sampler="bruteforce")
    study = open_study(study_name="x", storage_url=None, root=tmp_path / "studies", create=False)
    files, front = write_reports(study=study, out_dir=tmp_path / "out")
    trials = _read(files.trials_csv)
    measured = {r["format"] for r in trials if r["status"] == "measured"}
    assert measured == {"exl2", "gguf"}
    # each format was searched with its own cache modes only
    assert {r["cache_mode"] for r in trials if r["format"] == "exl2"} <= {"fp16", "q4"}
    assert {r["cache_mode"] for r in trials if r["format"] == "gguf"} <= {"f16", "q8_0"}
    assert {r["format"] for r in _read(files.pareto_csv)} <= {"exl2", "gguf"}
    lines = files.comparison.splitlines()
    assert lines[0].startswith("By format")
    assert [ln.split()[0] for ln in lines[1:]] == ["exl2", "gguf"]
    n_front = {ln.split()[0]: int(ln.split(",")[1].split()[0]) for ln in lines[1:]}
    assert sum(n_front.values()) == len(front)


def test_png_keeps_every_label_on_the_canvas_and_shares_the_page_colour_scale(
        study_root: tuple[Path, SearchSpec], tmp_path: Path) -> None:
    """pareto.png used to clip its rightmost label, and the page's colour scale stopped elsewhere."""
    from PIL import Image

    from optimizer.report.png import front_figure, labels_overlapping, texts_outside
    from optimizer.report.rows import context_range, pareto_rows, trial_rows

    root, _ = study_root
    study = open_study(study_name="r", storage_url=None, root=root, create=False)
    rows = trial_rows(study)
    front = pareto_rows(rows, study.user_attrs["variants"])
    # the fastest front point gets a long label: the case that was clipped at the right edge
    fastest = max(front, key=lambda r: r["gen_tok_s"])
    long_front = [dict(r, label=r["label"] + "-with-a-rather-long-label") if r is fastest else r for r in front]
    fig = front_figure(rows, long_front)
    assert texts_outside(fig) == []
    assert labels_overlapping(fig) == []
    # two front points almost on top of each other: their labels are moved apart
    twin = dict(long_front[0], label=long_front[0]["label"] + "-twin", gen_tok_s=long_front[0]["gen_tok_s"] * 1.001)
    assert labels_overlapping(front_figure(rows, [*long_front, twin])) == []
    # the colour bar spans exactly the measured contexts, as the page's scale does
    cbar = [im for ax in fig.axes for im in ax.collections if getattr(im, "norm", None) is not None and im.get_array() is not None]
    lo, hi = context_range(rows)
    assert (lo, hi) == (2048, 16384)
    assert all((c.norm.vmin, c.norm.vmax) == (lo, hi) for c in cbar) and cbar
    files, _ = write_reports(study=study, out_dir=tmp_path / "out")
    assert page_json(files.html.read_text())["ctx_range"] == [lo, hi]  # type: ignore[union-attr]
    # and in the PNG itself: the outermost pixels are background (no text touches or crosses an edge)
    img = Image.open(files.png).convert("L")  # type: ignore[arg-type]
    w, h = img.size
    px = img.load()
    edge = [px[x, y] for x in range(w) for y in (0, 1, h - 2, h - 1)] + [px[x, y] for y in range(h) for x in (0, 1, w - 2, w - 1)]
    assert min(edge) > 245, "something is drawn on the edge of pareto.png"


def test_texts_outside_sees_a_clipped_label() -> None:
    """The check itself: a label pushed past the right edge is reported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optimizer.report.png import texts_outside

    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.plot([0, 1], [0, 1])
    ax.annotate("a label that runs off the canvas", (1, 1), xytext=(6, 0), textcoords="offset points")
    fig.canvas.draw()
    assert texts_outside(fig) == ["a label that runs off the canvas"]
    plt.close(fig)


def test_report_open_opens_the_page_or_says_how(study_root: tuple[Path, SearchSpec], capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import webbrowser

    from optimizer.cli import main

    root, _ = study_root
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    main(["report", "r", "--studies-dir", str(root), "--open"])
    page = (root / "r" / "report.html").resolve().as_uri()
    assert opened == [page] and f"Opened {page}" in capsys.readouterr().out
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: False)  # no browser on this machine
    main(["report", "r", "--studies-dir", str(root), "--open"])
    out = " ".join(capsys.readouterr().out.split())
    assert "No web browser could be started here" in out and "report.html" in out
    with pytest.raises(SystemExit) as ei:
        main(["report", "r", "--studies-dir", str(root), "--open", "--no-plots"])
    assert ei.value.code == 2 and "--no-plots" in capsys.readouterr().err


def test_front_points_within_the_speed_noise_are_marked() -> None:
    """A point ahead of a better-perplexity one only by overlapping speed runs is marked; a clear one is not."""
    from optimizer.report.rows import pareto_rows

    def row(key: str, ppl: float, runs: list[float], ctx: int = 4096) -> dict:
        med = sorted(runs)[len(runs) // 2]
        return {"config_key": f"{key}|c", "state": "COMPLETE", "status": "measured", "vram_excess_gib": -0.1, "label": key,
                "cache_mode": "f16", "max_seq_len": ctx, "format": "gguf", "split": "1gpu", "perplexity": ppl, "gen_tok_s": med,
                "gen_tok_s_min": min(runs), "gen_tok_s_max": max(runs), "gen_tok_s_runs": runs, "speed_runs": len(runs)}

    rows = [row("B", 9.5, [44.0, 47.0, 49.0]), row("A", 10.0, [48.0, 50.0, 53.0]), row("C", 11.0, [68.0, 70.0, 72.0]),
            row("D", 12.0, [60.0, 61.0, 62.0])]  # D is dominated by C
    front = {r["label"]: r for r in pareto_rows(rows, {})}
    assert set(front) == {"A", "B", "C"}
    assert front["A"]["within_noise_of"] == "B f16 4096"
    assert front["B"]["within_noise_of"] == "" and front["C"]["within_noise_of"] == ""
    assert (front["A"]["gen_tok_s_min"], front["A"]["gen_tok_s_max"], front["A"]["speed_runs"]) == (48.0, 53.0, 3)
    # one run each: nothing can be called noise
    single = [dict(r, gen_tok_s_min=None, gen_tok_s_max=None, gen_tok_s_runs=[], speed_runs=1) for r in rows]
    assert all(r["within_noise_of"] == "" for r in pareto_rows(single, {}))


def test_report_without_matplotlib_writes_the_rest_and_says_how_to_get_the_plot(
        study_root: tuple[Path, SearchSpec], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib is the `plots` extra: the base install (README quick start) still reports, minus pareto.png."""
    import sys

    from optimizer.cli import main

    root, _ = study_root
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError, as when absent
    out_dir = root / "no-mpl"
    main(["report", "r", "--studies-dir", str(root), "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["pareto.csv", "report.html", "trials.csv"]
    assert "pareto.png not drawn: matplotlib is not installed (pip install 'exl2opt[plots]')" in out.splitlines()

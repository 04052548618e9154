"""`exl2opt plan` / `fit` through the real CLI entry point (in-process via main(), and one subprocess)."""

import csv
import json
import subprocess
import sys

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir

from optimizer.cli import main


@pytest.fixture()
def model_dir(tmp_path):
    make_exl2_dir(tmp_path / "m", "3.0bpw", TINY_LLAMA, bits=3.0)
    make_exl2_dir(tmp_path / "m", "5.0bpw", TINY_LLAMA, bits=5.0)
    return tmp_path / "m"


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_plan_json_has_per_gpu_breakdown(model_dir, capsys):
    code, out, _ = run(["plan", "-m", str(model_dir), "--vram", "1GB", "--ctx", "2048,4096", "--cache", "fp16,q4", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        (dev,) = r["devices"]
        parts = sum(dev[k] for k in ("overhead", "weights", "cache", "cache_staging", "scratch", "rope", "transient"))
        assert parts == dev["total"] == r["total_bytes"]
        assert dev["headroom"] == dev["budget"] - dev["margin"] - dev["total"]
        assert r["fits"] == (dev["total"] + dev["margin"] <= dev["budget"])


def test_plan_csv_and_two_gpus(model_dir, tmp_path, capsys):
    out_csv = tmp_path / "plan.csv"
    code, out, _ = run(["plan", "-m", str(model_dir), "--vram", "600MiB,600MiB", "--ctx", "8192", "--csv", str(out_csv)], capsys)
    assert code == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 2 * 5
    assert {r["split"] for r in rows} == {"auto:2"}
    assert all(len(r["per_gpu_gib"].split(";")) == 2 for r in rows)
    assert "Budget: 0.63 GB (0.59 GiB) + 0.63 GB (0.59 GiB)" in out


def test_fit_answers_largest_context_and_recipe(model_dir, capsys):
    code, out, _ = run(["fit", "-m", str(model_dir), "--vram", "520MiB", "--overhead", "480MiB", "--margin", "0", "--json"],
                       capsys)
    assert code == 0
    recs = json.loads(out)
    by = {(r["label"], r["cache"]): r for r in recs}
    assert by[("3.0bpw-h6", "q4")]["max_ctx"] >= by[("3.0bpw-h6", "fp16")]["max_ctx"]
    assert by[("3.0bpw-h6", "fp16")]["max_ctx"] >= by[("5.0bpw-h6", "fp16")]["max_ctx"]
    r = by[("3.0bpw-h6", "q4")]
    # single GPU: model.load() first, then the (non-lazy) cache, which follows model.cache_map
    assert r["run"] == (f"config.max_seq_len = {r['max_ctx']}; model = ExLlamaV2(config); model.load(); "
                        f"cache = ExLlamaV2Cache_Q4(model, max_seq_len={r['max_ctx']})")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gpus", "2", "--gpu-split", "10,10"], "not both"),
        (["--gpu-split", "10,x"], "--gpu-split"),
        (["--ctx", "12abc"], "--ctx"),
        (["--cache", "q3"], "unknown cache mode"),
        (["--vram", "24GB,24GB", "--gpus", "3"], "--vram lists 2 GPUs"),
    ],
)
def test_bad_options_are_usage_errors(model_dir, capsys, args, needle):
    argv = ["plan", "-m", str(model_dir)] + (["--vram", "15GB"] if "--vram" not in args else []) + args
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_help_and_plan_never_import_heavy_modules(model_dir):
    code = (
        "import sys\nfrom optimizer.cli import main\n"
        f"try:\n    main(['plan', '-m', {str(model_dir)!r}, '--vram', '15GB', '--json'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'exllamav2', 'optuna', 'llama_cpp', 'datasets') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["plan", "--bogus"], ["plan", "-m", "x"], ["nosuchcommand"]])
def test_click_usage_errors_exit_2_without_traceback(argv, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err and "internal error" not in err

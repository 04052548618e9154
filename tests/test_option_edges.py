"""Option edge cases (issue 9, class 8): any value gives a result in range or one short usage line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer.cli import _common as c
from optimizer.errors import BadOptionError, SizeParseError
from optimizer.space import Budget
from optimizer.storage import MAX_STUDY_NAME_BYTES, study_dir
from optimizer.units import MAX_SIZE, parse_size, parse_sizes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
BIG = "1" + "0" * 400
NUMBERS = st.one_of(st.integers(-(10**30), 10**30).map(str), st.floats(allow_nan=True).map(repr),
                    st.just(BIG), st.just("." + "0" * 300 + "1"), st.text("0123456789.,-+eE ", max_size=30))
UNITS = st.sampled_from(["", "B", "GB", "GiB", "MiB", "k", "TB", "PB", "x", "GB,", " gib "])


def _short_line(e: BaseException) -> None:
    text = str(e)
    assert "\n" not in text and len(text) < 300, text


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.tuples(NUMBERS, UNITS).map("".join), st.text(max_size=50)))
def test_any_size_is_bytes_in_range_or_one_line(text):
    try:
        n = parse_size(text)
    except SizeParseError as e:
        _short_line(e)
        return
    assert 0 < n <= MAX_SIZE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NUMBERS, UNITS).map("".join), min_size=1, max_size=100).map(",".join))
def test_any_size_list_is_at_most_64_gpus_or_one_line(text):
    try:
        per = parse_sizes(text)
    except SizeParseError as e:
        _short_line(e)
        return
    assert 1 <= len(per) <= 64


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(st.one_of(st.integers(-5, 2**30).map(str), NUMBERS, st.just("8k")), max_size=300).map(",".join),
                 st.text(max_size=40)))
def test_any_context_list_is_sorted_unique_tokens_or_one_line(text):
    try:
        out = c.parse_contexts(text)
    except BadOptionError as e:
        _short_line(e)
        return
    assert out is None or (list(out) == sorted(set(out)) and all(1 <= n <= 1 << 26 for n in out))


@settings(max_examples=300, deadline=None)
@given(split=st.lists(NUMBERS, min_size=1, max_size=80).map(",".join), gpus=st.one_of(st.none(), st.integers(-5, 10**20)))
def test_any_split_is_a_split_or_one_line(split, gpus):
    budget = Budget(per_device=(24 * 10**9,), overhead=None)
    for kw in ({"gpus": None, "gpu_split": split}, {"gpus": gpus, "gpu_split": None}):
        try:
            s = c.split_from(budget=budget, **kw)
        except BadOptionError as e:
            _short_line(e)
            continue
        assert 1 <= s.n_devices <= 64


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["fp16", "FP16", " q4", "q8 ", "Q4", "", "fp8"]), max_size=12).map(",".join))
def test_cache_lists_are_deduplicated_in_order(text):
    try:
        out = c.parse_caches(text)
    except BadOptionError:
        assert not any(p.strip() for p in text.split(","))
        return
    assert out is not None and len(out) == len(set(out))
    assert list(out) == list(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=150))
def test_any_study_name_is_one_folder_or_one_line(name):
    try:
        d = study_dir(study=name, root=Path("/r"))
    except BadOptionError as e:
        _short_line(e)
        return
    assert d.parent == Path("/r") and d.name == name and len(name.encode("utf-8", "surrogatepass")) <= MAX_STUDY_NAME_BYTES


RED_TEAM = {
    "vram 1<400 zeros>GB": ["--vram", BIG + "GB"],
    "batch 1<400 zeros>": ["--vram", "8GB", "--batch", BIG],
    "gpu-split of 30000": ["--vram", "8GB", "--gpu-split", ",".join(["1"] * 30000)],
    "n-gpu-layers 10^6": ["--vram", "8GB", "--n-gpu-layers", "1000000"],
    "chunk 0": ["--vram", "8GB", "--chunk", "0"],
    "ctx 1<400 zeros>": ["--vram", "8GB", "--ctx", BIG],
}
EXPECTED = {"vram 1<400 zeros>GB": "larger than 1 PiB", "batch 1<400 zeros>": "--batch must be between 1 and 4096",
            "gpu-split of 30000": "more than 64 GPUs", "n-gpu-layers 10^6": "between 0 and 100000",
            "chunk 0": "--chunk must be between", "ctx 1<400 zeros>": "between 1 and 67108864"}


@pytest.mark.parametrize("case", sorted(RED_TEAM))
def test_red_team_options_are_one_short_line(case, capsys):
    from optimizer.cli import main

    with pytest.raises(SystemExit) as se:
        main(["plan", "-m", str(EXAMPLE), *RED_TEAM[case]])
    err = capsys.readouterr().err
    assert se.value.code == 2 and err.count("\n") == 1 and len(err) < 300, err
    assert EXPECTED[case] in err


def test_csv_pointing_at_a_directory_is_refused_before_any_work(tmp_path, capsys):
    from optimizer.cli import main

    for cmd in ("plan", "fit"):
        with pytest.raises(SystemExit) as se:
            main([cmd, "-m", str(EXAMPLE), "--vram", "24GB", "--csv", str(tmp_path)])
        err = capsys.readouterr().err
        assert se.value.code == 2 and "is a directory" in err and err.count("\n") == 1


def test_duplicate_caches_give_each_row_once(capsys):
    from optimizer.cli import main

    main(["plan", "-m", str(EXAMPLE), "--vram", "24GB", "--ctx", "4096", "--cache", "fp16,fp16,FP16", "--json"])
    import json

    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["cache"] == "fp16"


@pytest.mark.parametrize(("opt", "value"), [("--seed", BIG), ("--min-ctx", BIG), ("--eval-windows", "0"),
                                            ("--eval-window", BIG), ("--speed-fill", "-1"), ("--n-trials", BIG)])
def test_search_integer_options_are_bounded(opt, value, tmp_path, capsys):
    from optimizer.cli import main

    with pytest.raises(SystemExit) as se:
        main(["search", "-m", str(EXAMPLE), "--vram", "24GB", "--studies-dir", str(tmp_path), opt, value])
    err = capsys.readouterr().err
    assert se.value.code == 2 and f"{opt} must be between" in err and len(err) < 300, err
    assert not any(tmp_path.iterdir())


def test_long_non_ascii_study_name_is_one_line(tmp_path, capsys):
    from optimizer.cli import main

    with pytest.raises(SystemExit) as se:
        main(["report", "é" * 130, "--studies-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert se.value.code in (1, 2) and "bytes in UTF-8" in err and err.count("\n") == 1


def test_search_with_an_invalid_study_name_is_one_line_and_writes_nothing(tmp_path, capsys):
    from optimizer.cli import main

    with pytest.raises(SystemExit) as se:
        main(["search", "-m", str(EXAMPLE), "--vram", "24GB", "--studies-dir", str(tmp_path), "--study", "../x"])
    err = capsys.readouterr().err
    assert se.value.code == 2 and err.startswith("exl2opt: error: invalid study name") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_search_with_a_bad_storage_url_is_one_line(tmp_path, capsys):
    from optimizer.cli import main

    with pytest.raises(SystemExit) as se:
        main(["search", "-m", str(EXAMPLE), "--vram", "24GB", "--studies-dir", str(tmp_path), "--storage", "bogus://x"])
    err = capsys.readouterr().err
    assert se.value.code == 1 and err.startswith("exl2opt: error:") and err.count("\n") == 1, err


@pytest.mark.parametrize("kind", ["empty", "directory"])
def test_search_with_unusable_eval_data_creates_no_study(kind, tmp_path, capsys):
    """An empty --eval-data file used to be found only after the study was created with it, so the
    corrected command was then refused as 'created with other settings'."""
    from optimizer.cli import main

    bad = tmp_path / "eval"
    if kind == "empty":
        bad = tmp_path / "empty.txt"
        bad.write_text("  \n")
    else:
        bad.mkdir()
    studies = tmp_path / "studies"
    with pytest.raises(SystemExit) as se:
        main(["search", "-m", str(EXAMPLE), "--vram", "24GB", "--studies-dir", str(studies), "--eval-data", str(bad)])
    err = capsys.readouterr().err
    assert se.value.code != 0 and err.count("\n") == 1, err
    assert ("holds no text" if kind == "empty" else "not a file") in err
    assert not studies.exists() or not any(studies.iterdir())

import pytest

from optimizer.errors import SizeParseError
from optimizer.units import GIB, fmt_both, parse_size, parse_sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("15GB", 15 * 10**9),
        ("15G", 15 * 10**9),
        ("15gb", 15 * 10**9),
        ("15GiB", 15 * 2**30),
        ("15000MiB", 15000 * 2**20),
        ("15.5GB", 15_500_000_000),
        ("1024", 1024),
        (" 24 GB ", 24 * 10**9),
        ("0.5TiB", 2**39),
    ],
)
def test_parse_size_accepts_documented_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["15XB", "", "GB", "0GB", "-3GB", "1e3GB", "15 G B", "nan", "inf GB", "9999999TB"])
def test_parse_size_rejects_junk_with_typed_error(text):
    with pytest.raises(SizeParseError) as e:
        parse_size(text)
    assert "\n" not in str(e.value) and text.strip() in str(e.value) or text == ""


def test_parse_sizes_per_gpu_list():
    assert parse_sizes("24GB,16GiB") == (24 * 10**9, 16 * GIB)
    with pytest.raises(SizeParseError):
        parse_sizes("24GB,,24GB")


def test_budget_printed_in_both_units():
    assert fmt_both(15 * 10**9) == "15.00 GB (13.97 GiB)"


def test_zero_only_where_allowed():
    assert parse_size("0MiB", allow_zero=True) == 0
    with pytest.raises(SizeParseError):
        parse_size("0MiB")
    with pytest.raises(SizeParseError):
        parse_size("-1MiB", allow_zero=True)

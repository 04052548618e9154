"""A streaming reader of safetensors header JSON whose limits hold for any input.

``json.loads`` builds the whole document before anything can be checked, so a header can make it
allocate far more than its own size (8.3 million empty lists cost 27x their bytes) and a byte
pattern count before parsing can be dodged with an escaped key (``"data_\\u006fffsets"``). This
reader walks the top-level object itself:

* keys are decoded with ``json.decoder.scanstring`` (escapes resolved), so every tensor entry is
  counted as an entry, whatever its spelling, and refused past ``max_tensors``;
* an entry must be ``{"dtype": string, "shape": [ints], "data_offsets": [ints]}`` (any order, each
  field once); integer lists are matched by one bounded regular expression (at most 16 integers of
  at most 20 digits), so no nesting, float or huge literal is ever built;
* ``__metadata__`` must be an object of strings (as the safetensors format defines it); its strings
  are decoded one at a time and dropped, so it costs no memory whatever its size;
* anything else (other JSON types, nesting, trailing data, duplicate keys) is refused.

Memory is the decoded text plus one small record per tensor (see ``docs/reliability.md`` for the
measured multiple). :func:`scan_header` yields ``(name, dtype, shape, data_offsets)`` per tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from json.decoder import scanstring  # type: ignore[attr-defined]  # the C scanner, as json uses it

from optimizer.errors import WeightsHeaderError

_WS = re.compile(r"[ \t\n\r]*")
_INT = r"-?(?:0|[1-9][0-9]{0,19})"
_INT_RE = re.compile(_INT)
_INT_LIST = re.compile(r"\[[ \t\n\r]*(?:" + _INT + r"(?:[ \t\n\r]*,[ \t\n\r]*" + _INT + r"){0,15})?[ \t\n\r]*\]")
_LONG_INT = re.compile(r"\[[ \t\n\r0-9,-]*[0-9]{21}")
_FIELDS = ("dtype", "shape", "data_offsets")
_W = r"[ \t\n\r]*"
_UINT = r"(?:0|[1-9][0-9]{0,19})"
#: Runs of plain ``"key": "value",`` metadata pairs (no escapes), skipped in one match; the
#: possessive ``*+`` keeps no backtracking state (a plain ``*`` costs ~500 bytes per pair).
_FAST_PAIRS = re.compile(r'(?:' + _W + r'"[^"\\\x00-\x1f]*"' + _W + ":" + _W + r'"[^"\\\x00-\x1f]*"' + _W + ",)*+")
#: The canonical entry as every writer spells it (plain key, fields in order): one match per tensor.
_FAST_ENTRY = re.compile(
    _W + r'"([^"\\\x00-\x1f]*)"' + _W + ":" + _W + r"\{" + _W + r'"dtype"' + _W + ":" + _W + r'"([A-Za-z0-9_]{1,16})"'
    + _W + "," + _W + r'"shape"' + _W + ":" + _W + r"\[" + _W + r"((?:" + _UINT + r"(?:" + _W + "," + _W + _UINT
    + r"){0,15})?)" + _W + r"\]" + _W + "," + _W + r'"data_offsets"' + _W + ":" + _W + r"\[" + _W + "(" + _UINT + ")"
    + _W + "," + _W + "(" + _UINT + ")" + _W + r"\]" + _W + r"\}")

Entry = tuple[str, str, list[int], list[int]]


class _Scanner:
    def __init__(self, text: str, name: str) -> None:
        self.text, self.name, self.pos = text, name, 0

    def fail(self, what: str) -> WeightsHeaderError:
        return WeightsHeaderError(f"{self.name}: safetensors header is not valid JSON of a tensor table "
                                  f"({what} at byte {self.pos})")

    def peek(self) -> str:
        self.pos = _WS.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.text[self.pos:self.pos + 1]

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.fail(f"expected {ch!r}")
        self.pos += 1

    def string(self) -> str:
        if self.peek() != '"':
            raise self.fail("expected a string")
        try:
            s, self.pos = scanstring(self.text, self.pos + 1, True)
        except (json.JSONDecodeError, ValueError):
            raise self.fail("invalid string") from None
        return s

    def int_list(self, *, key: str, field: str) -> list[int]:
        self.peek()
        m = _INT_LIST.match(self.text, self.pos)
        if m is None:
            if _LONG_INT.match(self.text, self.pos):
                raise WeightsHeaderError(f"{self.name}: safetensors header holds an absurd number literal")
            raise WeightsHeaderError(f"{self.name}: tensor {key[:80]!r} has an invalid {field} (not a short list of integers)")
        self.pos = m.end()
        return [int(x) for x in _INT_RE.findall(m.group())]

    def more(self) -> bool:
        """After a member: True on ``,`` (another member follows), False on ``}``."""
        c = self.peek()
        self.pos += 1
        if c == ",":
            return True
        if c == "}":
            return False
        self.pos -= 1
        raise self.fail("expected ',' or '}'")

    def metadata(self) -> None:
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            self.pos = _FAST_PAIRS.match(self.text, self.pos).end()  # type: ignore[union-attr]
            self.string()
            self.expect(":")
            self.string()
            if not self.more():
                return

    def entry(self, key: str) -> Entry:
        self.expect("{")
        fields: dict[str, object] = {}
        if self.peek() != "}":
            while True:
                k = self.string()
                self.expect(":")
                if k in fields or k not in _FIELDS:
                    raise self.fail(f"tensor {key[:80]!r}: unexpected or repeated field {k[:40]!r}")
                fields[k] = self.string() if k == "dtype" else self.int_list(key=key, field=k)
                if not self.more():
                    break
        else:
            self.pos += 1
        if len(fields) != 3:
            raise self.fail(f"tensor {key[:80]!r} lacks dtype, shape or data_offsets")
        return key, fields["dtype"], fields["shape"], fields["data_offsets"]  # type: ignore[return-value]


def scan_header(raw: bytes, *, name: str, max_tensors: int, count_only: bool = False) -> Iterator[Entry]:
    """Every tensor entry of a safetensors header, in file order, checked as described above.

    ``count_only``: a first pass that only counts and checks the syntax (repeated keys are not
    tracked, so it keeps nothing per entry).

    Raises:
        WeightsHeaderError: not UTF-8, not a flat tensor table, a repeated key, more than
            ``max_tensors`` entries.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WeightsHeaderError(f"{name}: safetensors header is not valid JSON (UnicodeDecodeError)") from None
    s = _Scanner(text, name)
    if s.peek() != "{":
        raise WeightsHeaderError(f"{name}: safetensors header is not a JSON object")
    s.pos += 1
    seen: set[str] = set()
    n = 0
    if s.peek() == "}":
        s.pos += 1
    else:
        fast = _FAST_ENTRY.match
        while True:
            m = fast(text, s.pos)
            if m is not None and not text.startswith('"__metadata__"', m.start(1) - 1):
                n += 1
                if n > max_tensors:
                    raise WeightsHeaderError(f"{name}: safetensors header lists more than {max_tensors} tensors")
                s.pos = m.end()
                if not count_only:  # the counting pass builds nothing per entry
                    key = m.group(1)
                    if key in seen:
                        raise s.fail(f"key {key[:80]!r} appears twice")
                    seen.add(key)
                    dims = m.group(3)
                    yield key, m.group(2), [int(x) for x in dims.split(",")] if dims else [], [int(m.group(4)), int(m.group(5))]
                if not s.more():
                    break
                continue
            key = s.string()
            s.expect(":")
            if not count_only:
                if key in seen:
                    raise s.fail(f"key {key[:80]!r} appears twice")
                seen.add(key)
            if key == "__metadata__":
                s.metadata()
            else:
                n += 1
                if n > max_tensors:
                    raise WeightsHeaderError(f"{name}: safetensors header lists more than {max_tensors} tensors")
                yield s.entry(key)
            if not s.more():
                break
    if s.peek() != "":
        raise s.fail("data after the table")

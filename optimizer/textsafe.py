"""Text that is safe to print: no terminal control sequences, no passwords, no rich markup.

Names printed by exl2opt (folder and file names, branch names, labels read from a header, study
names, storage URLs) may come from a hostile Hub or file. Every print site passes them through
:func:`safe` (or :func:`plain` for a rich renderable):

* :func:`strip_controls` turns C0/C1 control characters, DEL and bidirectional overrides into
  visible ``\\xNN`` / ``\\uNNNN`` escapes, so ``ESC ]52;c;...`` (an OSC 52 clipboard write) or a
  carriage return cannot act on the terminal;
* :func:`mask_urls` replaces the password of every ``scheme://user:password@host`` URL, and the
  value of ``password=`` / ``token=``-like query parameters, with ``***``;
* :func:`plain` wraps the result in a ``rich.text.Text``, so ``q[/b]`` is printed as it is and never
  parsed as markup.

Commands we print or write for a shell are built with :func:`shell_join` (``shlex.quote`` on every
value).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from typing import Any

#: C0 controls, DEL, C1 controls, zero-width and bidirectional formatting characters, lone surrogates
#: (a JSON ``\\ud800`` escape; unprintable on a UTF-8 terminal).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
#: ``scheme://user:password@`` (the password may not contain ``@``, ``/`` or whitespace).
_USERINFO_RE = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#]*:)(?P<pw>[^\s@/?#]*)@")
#: query/fragment/DSN parameters whose value is a secret.
_SECRET_PARAM_RE = re.compile(
    r"(?P<head>(?:[?&;#\s]|^)(?:password|passwd|pwd|pass|token|access_token|api_key|apikey|secret|sslpassword)=)"
    r"(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def strip_controls(text: str) -> str:
    """``text`` with every control / bidi / zero-width character shown as a visible escape."""
    return _CONTROL_RE.sub(_escape, text)


def mask_urls(text: str) -> str:
    """``text`` with URL passwords (``user:***@host``) and secret query parameters (``password=***``) hidden."""
    text = _USERINFO_RE.sub(lambda m: m.group("head") + ("***" if m.group("pw") else "") + "@", text)
    return _SECRET_PARAM_RE.sub(lambda m: m.group("head") + ("***" if m.group("value") else ""), text)


def safe(value: Any) -> str:
    """``str(value)`` ready for a terminal or a log line: passwords masked, controls escaped."""
    return strip_controls(mask_urls(str(value)))


def plain(value: Any) -> Any:
    """A ``rich.text.Text`` of :func:`safe` ``(value)``: printed as plain text, never as markup."""
    from rich.text import Text

    return Text(safe(value))


def shell_join(args: Iterable[str]) -> str:
    """One shell command line from ``args``, every value quoted with ``shlex.quote``."""
    return " ".join(shlex.quote(str(a)) for a in args)

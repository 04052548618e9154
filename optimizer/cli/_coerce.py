"""Option values converted without pydantic, so start-up does not pay for it.

typer 0.29 converts every non-flag option value (even an absent one, and the root's ``--help``)
through a pydantic ``TypeAdapter``: importing pydantic costs 50-110 ms on our 2-core machine, more
than the whole rest of ``exl2opt --help``. Our options only use ``str``, ``int``, ``float``,
``bool``, ``Path`` and ``list[str]`` with no range or path checks, which need none of that. The
command classes here give each such parameter a plain converter before click processes it; any
other parameter keeps typer's own conversion. Nothing changes if typer's internals move: the hook
then does nothing and typer converts as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
import typer.core

try:  # typer's runtime-coercion contract (typer >= 0.25); absent: keep typer's own conversion
    from typer._coercion import RuntimeParam
except ImportError:  # pragma: no cover
    RuntimeParam = None  # type: ignore[assignment,misc]


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text.lstrip("+-").isdigit():
        raise ValueError
    return int(text)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    out = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    if not math.isfinite(out):
        raise ValueError
    return out


def _to_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("", "0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError


_LEAVES: dict[Any, tuple[Callable[[Any], Any], str]] = {
    int: (_to_int, "an integer"),
    float: (_to_float, "a finite number"),
    str: (_to_str, "a string"),
    bool: (_to_bool, "a boolean"),
    Path: (lambda v: v if isinstance(v, Path) else Path(_to_str(v)), "a path"),
}


def _converter(annotation: Any) -> tuple[Callable[[Any], Any], str] | None:
    """The plain converter for ``annotation`` (and the kind named in its error), or None."""
    if get_origin(annotation) is list:
        args = get_args(annotation)
        leaf = _LEAVES.get(args[0]) if len(args) == 1 else None
        if leaf is None:
            return None
        conv, kind = leaf
        return (lambda v: [conv(x) for x in (v if isinstance(v, (list, tuple)) else [v])]), kind
    return _LEAVES.get(annotation)


def _plain_enough(info: Any) -> bool:
    """No range, parser, choices or path checks: exactly what the plain converters do."""
    checks = ("min", "max", "parser", "click_type", "formats")
    if any(getattr(info, k, None) is not None for k in checks):
        return False
    path_flags = {"exists": False, "resolve_path": False, "file_okay": True, "dir_okay": True, "readable": True,
                  "writable": False, "allow_dash": False, "path_type": None}
    return all(getattr(info, k, v) == v for k, v in path_flags.items())


if RuntimeParam is not None:

    @dataclass(frozen=True)
    class _PlainParam(RuntimeParam):
        convert: Callable[[Any], Any]
        kind: str

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.convert(value)
            except (TypeError, ValueError):
                shown = value if isinstance(value, str) else ",".join(map(str, value)) \
                    if isinstance(value, (list, tuple)) else value
                raise typer.BadParameter(f"{str(shown)!r} is not {self.kind}", ctx=ctx, param=param) from None


def _install(params: Sequence[Any]) -> None:
    """Give each plain parameter of ``params`` a pydantic-free converter (once)."""
    if RuntimeParam is None:
        return  # pragma: no cover
    for p in params:
        desc = getattr(p, "type_descriptor", None)
        if desc is None or getattr(p, "_runtime_param", "absent") is not None:
            continue
        found = _converter(desc.annotation)
        if found is None or not _plain_enough(desc.parameter_info):
            continue
        p._runtime_param = _PlainParam(parameter_info=desc.parameter_info, annotation=desc.annotation,
                                       convert=found[0], kind=found[1])


class PlainGroup(typer.core.TyperGroup):
    """The root command group: its own and its subcommands' options converted without pydantic."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _install(params)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _install(cmd.get_params(ctx))
        return cmd

"""The ``exl2opt`` command: a thin typer app. Commands parse, call the library, format.

Errors: library code raises :class:`~optimizer.errors.Exl2optError`; :func:`main` prints its
message as one line on stderr and exits with its code. ``--debug`` or ``EXL2OPT_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

import typer

from optimizer import __version__
from optimizer.cli._coerce import PlainGroup
from optimizer.errors import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_TERMINATED,
    Exl2optError,
    RunInterrupted,
    storage_os_error,
)
from optimizer.textsafe import safe

app = typer.Typer(
    name="exl2opt",
    cls=PlainGroup,
    help="Find the quantized LLM variant and the settings (context, cache, GPU split) that fit your VRAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

_DEBUG = {"on": False}
_TERMINATED = {"on": False}


def _version(value: bool) -> None:
    if value:
        print(f"exl2opt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    _DEBUG["on"] = debug or _DEBUG["on"]


def _register() -> None:
    from optimizer.cli import plan as _plan  # noqa: F401  (commands register themselves)

    for name in ("search", "report", "worker", "calibrate"):
        try:
            __import__(f"optimizer.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"optimizer.cli.{name}":
                raise


_register()


def _is_click_error(e: BaseException) -> bool:
    """A click usage error (unknown option, missing value...). Typer 0.29 vendors its own click
    (``typer._click``), so match any ``ClickException`` class by name rather than by identity."""
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "show")


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    """SIGTERM is handled like Ctrl-C (the running trial is failed as interrupted), exit 143."""
    _TERMINATED["on"] = True
    raise KeyboardInterrupt


def _stopped_by() -> tuple[str, int]:
    return ("terminated (SIGTERM)", EXIT_TERMINATED) if _TERMINATED["on"] else ("interrupted", EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    _DEBUG["on"] = os.environ.get("EXL2OPT_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])
    _TERMINATED["on"] = False
    old = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        rc = app(args=argv, standalone_mode=False)
        # typer >= 0.2x turns Ctrl-C (Abort) into a returned exit code 130 instead of raising
        if isinstance(rc, int) and rc == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
    except RunInterrupted as e:
        if _DEBUG["on"]:
            raise
        what, code = _stopped_by()
        print(f"exl2opt: {what}: {safe(e)}", file=sys.stderr)
        sys.exit(code)
    except Exl2optError as e:
        if _DEBUG["on"]:
            raise
        print(f"exl2opt: error: {safe(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if _DEBUG["on"]:
            raise
        what, code = _stopped_by()
        print(f"exl2opt: {what}", file=sys.stderr)
        sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("exl2opt: aborted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as e:  # read-only or full disk, permission, name too long: one line (errors.storage_os_error)
        if _DEBUG["on"]:
            raise
        err = storage_os_error(e, doing="continue")
        print(f"exl2opt: error: {safe(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as e:  # click usage errors and anything unexpected
        if _is_click_error(e):
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if _DEBUG["on"]:
            raise
        print(f"exl2opt: internal error: {type(e).__name__}: {safe(e)} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(EXIT_RUNTIME)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)

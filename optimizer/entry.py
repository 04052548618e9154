"""The console script's entry point: only a guard around importing the CLI.

A Ctrl-C in the first few hundred milliseconds lands while typer and the commands are still being
imported, before :func:`optimizer.cli.main` can handle it; here it still gives one line on stderr and
exit 130 instead of a traceback (``--debug`` or ``EXL2OPT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import os
import sys

EXIT_INTERRUPTED = 130  # as optimizer.errors.EXIT_INTERRUPTED (not imported: it is the import being guarded)


def main() -> None:
    """Import the CLI and run it; a Ctrl-C during the import exits 130 with one line."""
    try:
        from optimizer.cli import main as cli_main
    except KeyboardInterrupt:
        if os.environ.get("EXL2OPT_DEBUG", "") not in ("", "0") or "--debug" in sys.argv[1:]:
            raise
        print("exl2opt: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    cli_main()

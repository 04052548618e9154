"""Typed errors of exl2opt and the one place that maps them to exit codes.

Library code raises these; the CLI (``optimizer.cli``) prints ``str(error)`` as one line on stderr
and exits with ``error.exit_code``. Nothing else in the package prints errors or calls ``sys.exit``.

Exit codes:
    2  usage error: the input given on the command line is wrong (bad size, bad path, bad option)
    1  runtime error: the input is well formed but something failed (network, hub, storage, engine)
    130 interrupted (Ctrl-C)
    143 terminated (SIGTERM), handled like Ctrl-C
"""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Exl2optError(Exception):
    """Base class. ``str()`` is a complete one-line message for a person."""

    exit_code: int = EXIT_RUNTIME


# ----- usage errors (exit 2): the user can fix the command line -------------------------------


class UsageError(Exl2optError):
    """Input given on the command line is invalid."""

    exit_code = EXIT_USAGE


class SizeParseError(UsageError):
    """A memory size such as ``15GB`` could not be parsed or is not positive."""


class BadOptionError(UsageError):
    """An option value is invalid (unknown cache mode, bad split list, bad context list...)."""


class ModelSourceError(UsageError):
    """A ``--model`` value does not name a usable local directory or Hub repository."""


class ModelConfigError(UsageError):
    """config.json is missing, malformed, or lacks a dimension the VRAM model needs."""


class UnsupportedArchitectureError(ModelConfigError):
    """The architecture is not one exl2opt can size; it is refused by name, never guessed."""


class WeightsHeaderError(ModelConfigError):
    """A safetensors / GGUF header is missing, truncated, malformed or hostile."""


# ----- runtime errors (exit 1) -----------------------------------------------------------------


class HubError(Exl2optError):
    """The Hugging Face Hub (or a mirror given by HF_ENDPOINT) could not answer."""


class RepoNotFoundError(HubError):
    """The repository does not exist or is private."""

    exit_code = EXIT_USAGE


class RevisionNotFoundError(HubError):
    """The branch / tag / commit does not exist in the repository."""

    exit_code = EXIT_USAGE


class GatedRepoError(HubError):
    """The repository is gated and no (or an unauthorized) token was available."""


class OfflineError(HubError):
    """No network (or offline mode) and nothing usable in the metadata cache."""


class BackendUnavailableError(Exl2optError):
    """A measurement backend cannot run here (missing extra, no CUDA, no llama.cpp)."""


class EngineError(Exl2optError):
    """One configuration failed inside a backend (the engine freed the GPU and stays usable)."""


class EngineTransientError(EngineError):
    """A configuration failed for a passing reason (the Hub unreachable after bounded retries); the
    study measures it again in its next run instead of recording the failure as final."""


class EngineOOMError(EngineError):
    """A configuration ran out of device memory while loading or measuring (trial reason ``oom``)."""


class EvalDataError(Exl2optError):
    """Evaluation text could not be loaded (offline without --eval-data, unreadable file...)."""


class StorageError(Exl2optError):
    """The Optuna storage could not be opened or reached."""


def storage_os_error(e: OSError, *, doing: str) -> StorageError:
    """One line for an OS error while reading or writing a study, reports or caches: read-only,
    full disk and permission denied are named as such (the path is shown, never a URL)."""
    import errno

    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"cannot {doing}: no space left on the device{' of' + where if where else ''}; free some "
                            "space and rerun (finished trials are kept)")
    if e.errno == errno.EROFS:
        return StorageError(f"cannot {doing}: {where.strip() or 'the study folder'} is on a read-only file system; "
                            "use a writable folder (--studies-dir, or --out for report)")
    if e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot {doing}: permission denied for{where or ' the study folder'}")
    if e.errno == errno.ENAMETOOLONG:
        return StorageError(f"cannot {doing}: a file name is too long for the file system (use a shorter --study name)")
    return StorageError(f"cannot {doing}: {e.strerror or type(e).__name__}{where}")


class StudyError(Exl2optError):
    """The study cannot run as asked (no feasible configuration, mismatched study...)."""


class StudyBusyError(StudyError):
    """Another process runs this embedded study in a way that excludes this one (one search, or workers)."""


class RunInterrupted(Exl2optError):
    """A study run stopped by Ctrl-C or SIGTERM; the message says what was kept and how to resume.

    The CLI exits 130 (Ctrl-C) or 143 (SIGTERM)."""

    exit_code = EXIT_INTERRUPTED

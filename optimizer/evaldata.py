"""Evaluation text for perplexity: wikitext-2-raw-v1 (test split) via ``datasets``, or a local file.

Protocol (the window / prefill / chunk / BOS rules are in
:class:`optimizer.backends.base.EvalProtocol`): the text is the rows of the source joined with
``"\\n\\n"`` (as exllamav2's ``compare_quants.py`` and the HF perplexity guide do), tokenized once per
variant without BOS by the backend's tokenizer, and cut into back-to-back windows from the start.

Local files (``--eval-data``): ``.txt`` is read as UTF-8 as is; ``.parquet`` uses its ``text``
column (or its first string column), rows joined with ``"\\n\\n"``. The dataset id stored with
every perplexity is ``wikitext-2-raw-v1:test`` or ``file:<name>:<sha256 prefix>``, so results
from different texts are never mixed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import EvalDataError

WIKITEXT_ID = "wikitext-2-raw-v1:test"
#: Seconds to wait for the Hub before giving up on the default dataset.
HUB_TIMEOUT_S = 10
#: Largest local evaluation file read (bytes); perplexity uses a few hundred KB at most
#: (windows x window tokens), so a bigger file is almost surely the wrong one.
MAX_EVAL_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class EvalText:
    """Evaluation text and its stable id (part of the perplexity memo key)."""

    dataset_id: str
    text: str


def file_dataset_id(path: Path) -> str:
    """``file:<name>:<sha256[:12]>`` of a local evaluation file."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:  # streamed: never the whole file in memory for the id
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()[:12]
    except OSError as e:
        raise EvalDataError(f"--eval-data {path}: cannot read ({e.strerror})") from None
    return f"file:{path.name}:{digest}"


def dataset_id_for(path: Path | None) -> str:
    """The dataset id without loading the text (cheap; used to build the eval protocol)."""
    return WIKITEXT_ID if path is None else file_dataset_id(path)


def load_eval_text(*, path: Path | None) -> EvalText:
    """The evaluation text: ``path`` (.txt / .parquet) or wikitext-2-raw-v1 test from the Hub."""
    if path is not None:
        return EvalText(dataset_id=file_dataset_id(path), text=_read_local(path))
    return EvalText(dataset_id=WIKITEXT_ID, text=_wikitext())


def _read_local(path: Path) -> str:
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EvalDataError(f"--eval-data {path}: cannot read ({e.strerror})") from None
    if size > MAX_EVAL_BYTES:
        raise EvalDataError(f"--eval-data {path}: file too large ({size / 2**20:.0f} MiB > "
                            f"{MAX_EVAL_BYTES / 2**20:.0f} MiB); perplexity needs only a few hundred KB of text, "
                            "pass a smaller file")
    if suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EvalDataError(f"--eval-data {path}: cannot read as UTF-8 text ({e})") from None
    elif suffix == ".parquet":
        text = _read_parquet(path)
    else:
        raise EvalDataError(f"--eval-data {path}: expected a .txt or .parquet file")
    if not text.strip():
        raise EvalDataError(f"--eval-data {path}: the file holds no text")
    return text


def _read_parquet(path: Path) -> str:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:
        raise EvalDataError(f"--eval-data {path}: cannot read parquet ({type(e).__name__})") from None
    cols = ["text"] if "text" in df.columns else [c for c in df.columns if _is_text_column(df[c])][:1]
    if not cols:
        raise EvalDataError(f"--eval-data {path}: no text column (expected a string column, ideally named 'text')")
    return "\n\n".join(x for x in df[cols[0]].tolist() if isinstance(x, str))


def _is_text_column(col: Any) -> bool:
    """A column of strings (pandas 3 reads them as the ``str`` dtype, older pandas as ``object``)."""
    import pandas as pd

    if not (pd.api.types.is_string_dtype(col.dtype) or col.dtype == object):
        return False
    values = col.dropna().tolist()[:100]
    return bool(values) and all(isinstance(x, str) for x in values)


def _wikitext() -> str:
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_TIMEOUT_S))
    hint = ("cannot load wikitext-2-raw-v1 from the Hub (offline?); pass a local evaluation text "
            "with --eval-data FILE.txt or FILE.parquet")
    try:
        import datasets
    except ImportError:
        raise EvalDataError(f"the 'datasets' package is missing; {hint.split('; ')[1]}") from None
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except (ConnectionError, OSError, TimeoutError) as e:
        raise EvalDataError(f"{hint} ({type(e).__name__})") from None
    except Exception as e:  # datasets wraps network failures in several classes
        raise EvalDataError(f"{hint} ({type(e).__name__})") from None
    return "\n\n".join(ds["text"])

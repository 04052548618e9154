"""Fetch a Hub variant's files for measurement (the only place exl2opt downloads weights).

Discovery never downloads weights; a ``search`` trial that must load a Hub variant calls
:func:`local_path`, which downloads exactly that variant into the Hugging Face cache at its recorded
commit (``HF_ENDPOINT`` / ``HF_TOKEN`` as huggingface_hub reads them) and returns a local path the
engine can open. Local variants are returned as they are.
"""

from __future__ import annotations

import os

from optimizer.errors import EngineError
from optimizer.variant import Variant


def local_path(variant: Variant) -> str:
    """A local directory (exl2) or first file (GGUF) holding ``variant``, downloading it if needed.

    Raises:
        EngineError: the download failed (one line; the token is never shown).
    """
    loc = variant.location
    if loc.kind == "local":
        if not loc.path:
            raise EngineError(f"{variant.source}: no local path")
        return loc.path
    if variant.format == "gguf":
        return _download_files(variant)
    return _download_snapshot(variant)


def _revision(variant: Variant) -> str | None:
    return variant.location.commit or variant.location.revision


def _download_snapshot(variant: Variant) -> str:
    """exl2: the whole revision (or its bpw sub-folder): weights, config.json and tokenizer."""
    from huggingface_hub import snapshot_download

    loc = variant.location
    patterns = [f"{loc.subfolder}/*"] if loc.subfolder else None
    try:
        root = snapshot_download(loc.repo_id or "", revision=_revision(variant), allow_patterns=patterns,
                                 endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as e:  # any Hub/transport failure fails this configuration only
        raise EngineError(f"{variant.source}: cannot download ({type(e).__name__})") from None
    return os.path.join(root, loc.subfolder) if loc.subfolder else root


def _download_files(variant: Variant) -> str:
    """GGUF: the variant's file(s); split parts land beside each other, as llama.cpp expects."""
    from huggingface_hub import hf_hub_download

    loc = variant.location
    paths = []
    for f in loc.files:
        name = f"{loc.subfolder}/{f}" if loc.subfolder else f
        try:
            paths.append(hf_hub_download(loc.repo_id or "", name, revision=_revision(variant),
                                         endpoint=os.environ.get("HF_ENDPOINT") or None))
        except Exception as e:  # any Hub/transport failure fails this configuration only
            raise EngineError(f"{variant.source}: cannot download {name} ({type(e).__name__})") from None
    if not paths:
        raise EngineError(f"{variant.source}: no GGUF file to download")
    return str(paths[0])

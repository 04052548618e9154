"""GGUF variants from the local file system: a ``.gguf`` file, or a directory of ``.gguf`` files.

One variant per quant file; split files (``name-00001-of-00003.gguf``) form one variant whose tensors
are the union of every part's header. Only headers are read, never tensor data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from optimizer.errors import ModelSourceError
from optimizer.variant import Location, TensorInfo, Variant

if TYPE_CHECKING:  # formats.gguf is imported by the readers below, so exl2 paths never load it
    from optimizer.formats.gguf import GgufHeader

_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)


def is_gguf_path(path: Path) -> bool:
    """A ``.gguf`` file, or a directory with ``.gguf`` files and no ``config.json``."""
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def group_files(files: list[Path]) -> list[list[Path]]:
    """Group split parts together (in part order); single files are groups of one. Sorted by name.

    Raises:
        ModelSourceError: a split set with missing parts.
    """
    groups: dict[str, list[tuple[int, int, Path]]] = {}
    for f in files:
        m = _SPLIT_RE.match(f.name)
        if m:
            groups.setdefault(str(f.parent / m.group("stem")), []).append((int(m.group("i")), int(m.group("n")), f))
        else:
            groups[str(f)] = [(1, 1, f)]
    out: list[list[Path]] = []
    for key in sorted(groups):
        parts = sorted(groups[key])
        n = parts[0][1]
        if [p[0] for p in parts] != list(range(1, n + 1)) or any(p[1] != n for p in parts):
            raise ModelSourceError(f"{key}: incomplete GGUF split set (have parts {[p[0] for p in parts]} of {n})")
        out.append([p[2] for p in parts])
    return out


def variant_from_headers(headers: list[GgufHeader], *, location: Location, name: str) -> Variant:
    """One GGUF variant from the headers of its file (or of every part of a split set, in order).

    Shared by local discovery and a Hub source (which reads headers with
    ``optimizer.formats.gguf.read_header`` over ``http_range_reader``). ``name`` is the file name
    without ``.gguf`` and split suffix, used for the label when ``general.file_type`` is absent.
    """
    from optimizer.formats.gguf import config_from_header, file_type_label

    tensors = [TensorInfo(name=t.name, dtype=t.type_name, shape=t.shape, nbytes=t.nbytes)
               for h in headers for t in h.tensors]
    n_elem = sum(_numel(t.shape) for t in tensors)
    bits = 8 * sum(t.nbytes for t in tensors) / n_elem if n_elem else None
    return Variant(
        format="gguf",
        label=file_type_label(headers[0].kv, name),
        location=location,
        config=config_from_header(headers[0]),
        tensors=tuple(tensors),
        bits=round(bits, 3) if bits else None,
    )


def variant_from_files(parts: list[Path]) -> Variant:
    """One GGUF variant from one file or the ordered parts of a split set."""
    from optimizer.formats.gguf import read_header_file

    m = _SPLIT_RE.match(parts[0].name)
    stem = m.group("stem") if m else parts[0].stem
    return variant_from_headers([read_header_file(p) for p in parts], name=stem,
                                location=Location(kind="local", path=str(parts[0]), files=tuple(p.name for p in parts)))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def discover_gguf(path: Path) -> list[Variant]:
    """Variants of a ``.gguf`` file (with its sibling parts if it is part 1 of a split) or a directory."""
    if path.is_file():
        m = _SPLIT_RE.match(path.name)
        if m:
            siblings = [p for p in path.parent.glob("*.gguf") if (s := _SPLIT_RE.match(p.name)) and s.group("stem") == m.group("stem")]
            return [variant_from_files(g) for g in group_files(siblings)]
        return [variant_from_files([path])]
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if not files:
        raise ModelSourceError(f"{path}: no .gguf files")
    return [variant_from_files(g) for g in group_files(files)]

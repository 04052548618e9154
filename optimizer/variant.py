"""What exl2opt knows about one downloadable variant, from metadata only (never weight data).

A :class:`Variant` is produced by a source (``optimizer.sources``) and consumed by a format's memory
rules (``optimizer.formats``). It carries the model's config (a plain dict as read from config.json,
or the equivalent built from a GGUF header), the exact byte size of every stored tensor (from the
safetensors / GGUF headers), and where the variant lives so a report can say how to download it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor. ``nbytes`` is its exact size on disk in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Location:
    """Where a variant lives.

    ``kind`` is ``"local"`` (``path`` is a directory or file) or ``"hub"`` (``repo_id`` at
    ``revision``, resolved to ``commit`` when known; ``subfolder`` for bpw sub-folder layouts).
    """

    kind: str
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    subfolder: str | None = None
    files: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        """``org/name@revision[/subfolder]`` for the Hub, the path for local variants."""
        if self.kind == "hub":
            s = f"{self.repo_id}@{self.revision or 'main'}"
            s = f"{s}/{self.subfolder}" if self.subfolder else s
            return f"{s}/{self.files[0]}" if self.is_gguf_files else s
        return str(self.path)

    @property
    def is_gguf_files(self) -> bool:
        """The variant is a set of ``.gguf`` files (one per quant): they, not a folder, identify it."""
        return bool(self.files) and all(f.lower().endswith(".gguf") for f in self.files)

    @property
    def local_dir(self) -> str:
        """The folder :meth:`download_command` downloads into: ``name`` or ``name-revision``."""
        name = (self.repo_id or "model").split("/")[-1]
        label = self.revision if self.revision and self.revision != "main" else ""
        return f"{name}-{label.replace('/', '_')}" if label else name

    def download_command(self) -> str:
        """A shell command that fetches exactly this variant (empty for local variants).

        Every value (repo id, revision, ``--include`` pattern, file names, local directory) is
        quoted with ``shlex.quote``: a branch named ``4.0bpw;touch${IFS}x;#`` is a valid git ref,
        and pasting the command must not run it.
        """
        if self.kind != "hub":
            return ""
        from optimizer.textsafe import shell_join

        args = ["hf", "download", self.repo_id or "model"]
        if self.is_gguf_files:  # exactly this quant's file(s): hf download org/name [sub/]file ...
            args += [f"{self.subfolder}/{f}" if self.subfolder else f for f in self.files]
        elif self.subfolder:
            args += ["--include", f"{self.subfolder}/*"]
        if self.revision and self.revision != "main":
            args += ["--revision", self.revision]
        return shell_join(args + ["--local-dir", self.local_dir])


@dataclass(frozen=True)
class Variant:
    """One quantized variant (one bpw branch, one repo, one directory or one GGUF file).

    Attributes:
        format: a name registered in ``optimizer.formats.FORMATS`` (``exl2``, ``exl3``, ``gguf``);
            selects the memory rules, the recipes and the backend.
        label: short human label, e.g. ``"3.0bpw-h6"`` or ``"Q4_0"``.
        location: where it lives (see :class:`Location`).
        config: the model config as a plain JSON-like dict (config.json for exl2).
        tensors: every stored tensor with its exact byte size.
        bits: nominal bits per weight of the decoder (exl2 ``quantization_config.bits``), if known.
        head_bits: bits of the output head (exl2 ``head_bits``), if known.
    """

    format: str
    label: str
    location: Location
    config: Mapping[str, Any] = field(compare=False, hash=False, repr=False)
    tensors: tuple[TensorInfo, ...] = field(compare=False, hash=False, repr=False)
    bits: float | None = None
    head_bits: int | None = None

    def __post_init__(self) -> None:
        # the label is printed everywhere (tables, progress, reports): never a control sequence
        from optimizer.textsafe import strip_controls

        clean = strip_controls(self.label)
        if clean != self.label:
            object.__setattr__(self, "label", clean)

    @property
    def source(self) -> str:
        """Stable display id of the variant: ``repo@revision`` or a path."""
        return self.location.display

    @property
    def key(self) -> str:
        """Stable identity used in studies and reports."""
        return f"{self.format}:{self.source}"

    @property
    def total_bytes(self) -> int:
        """Sum of all stored tensor bytes (the download size of the weights)."""
        return sum(t.nbytes for t in self.tensors)

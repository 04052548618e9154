"""Variants from the local file system: one model directory, or a directory of variant directories.

Only config.json and the safetensors *headers* are read, never tensor data.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from optimizer.arch import quant_bits
from optimizer.errors import ModelConfigError, ModelSourceError, WeightsHeaderError
from optimizer.formats import FORMATS, folder_format, format_spec
from optimizer.safetensors_header import read_safetensors_header
from optimizer.textsafe import strip_controls
from optimizer.variant import Location, TensorInfo, Variant

#: config.json files larger than this are refused (real ones are < 100 kB).
MAX_CONFIG_BYTES = 4 * 2**20


def load_config_bytes(raw: bytes, *, name: str) -> dict[str, Any]:
    """Parse config.json bytes into a dict, with one clear error for anything malformed."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelConfigError(f"{name}: config.json is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{name}: config.json is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelConfigError(f"{name}: config.json is nested too deeply") from None
    except ValueError:  # e.g. an integer literal of thousands of digits (int max str digits)
        raise ModelConfigError(f"{name}: config.json holds an absurd number literal") from None
    if not isinstance(doc, dict):
        raise ModelConfigError(f"{name}: config.json must be a JSON object")
    return doc


_BPW_RE = re.compile(r"(?:^|[^0-9.])(\d{1,2}(?:[._]\d{1,3})?)bpw", re.IGNORECASE)
_BRANCH_BPW_RE = re.compile(r"^(\d{1,2})_(\d{1,3})(?:[-_]h(?:b)?(\d))?$", re.IGNORECASE)
_HB_RE = re.compile(r"[-_]h(?:b)?(\d)(?:$|[-_])", re.IGNORECASE)


def bits_from_name(name: str) -> tuple[float | None, int | None]:
    """(bpw, head_bits) hinted by a branch, repo or directory name such as ``3.0bpw-h6`` or ``6_5``.

    Names are hints only; config.json and header bytes are the truth.
    """
    bits: float | None = None
    m = _BRANCH_BPW_RE.match(name)
    if m:
        bits = float(f"{m.group(1)}.{m.group(2)}")
    else:
        mb = _BPW_RE.search(name)
        if mb:
            bits = float(mb.group(1).replace("_", "."))
    mh = _HB_RE.search(name + "-")
    head = int(mh.group(1)) if mh else None
    return (bits if bits is not None and 1 <= bits <= 16 else None), head


def variant_label(config: dict[str, Any], fallback: str) -> str:
    """``3.0bpw-h6`` from a quant format's ``quantization_config`` or the name, else ``fallback`` (with any
    control character shown as an escape: a label is printed and written everywhere)."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") in {s.quant_method for s in FORMATS.values()} - {None}:
        bits, hb = qc.get("bits"), qc.get("head_bits")
        if isinstance(bits, (int, float)) and not isinstance(bits, bool) and 0 < bits <= 32:
            label = f"{float(bits):.2f}".rstrip("0").rstrip(".")
            label = label if "." in label else f"{label}.0"
            return f"{label}bpw" + (f"-h{hb}" if isinstance(hb, int) and not isinstance(hb, bool) and 0 <= hb <= 16 else "")
    bits, head = bits_from_name(fallback)
    if bits is not None:
        text = f"{bits:g}" + ("" if "." in f"{bits:g}" else ".0")
        return text + "bpw" + (f"-h{head}" if head else "")
    return strip_controls(fallback)


def weight_files(names: list[str], fmt: str) -> list[str]:
    """The files of ``names`` that hold weights of format ``fmt`` in a local folder (the registry's
    ``local_shards`` rule; converter leftovers excluded)."""
    spec = format_spec(fmt)
    return sorted(n for n in names if spec.is_shard(os.path.basename(n), local=True))


_DECODER_LAYER_RE = re.compile(r"(?:^|\.)layers\.\d+\.")


def check_tensor_table(tensors: list[TensorInfo], *, name: str) -> None:
    """Refuse weight headers that cannot be a decoder model (no tensors, no ``layers.N.`` tensor).

    Raises:
        WeightsHeaderError: the headers hold no tensors or no decoder layer.
    """
    if not tensors:
        raise WeightsHeaderError(f"{name}: the safetensors headers hold no tensors")
    if not any(_DECODER_LAYER_RE.search(t.name) for t in tensors):
        raise WeightsHeaderError(f"{name}: the safetensors headers hold no decoder layer ('layers.N.' tensors)")


def variant_from_dir(path: Path) -> Variant:
    """One variant from a directory holding config.json and safetensors shards."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelSourceError(f"{path}: no config.json (not a model directory)")
    try:
        with open(cfg_path, "rb") as fh:  # bounded read: never more than the cap (+1 to detect excess)
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ModelSourceError(f"{cfg_path}: cannot read ({e.strerror})") from None
    config = load_config_bytes(raw, name=str(path))
    fmt = folder_format(config).name
    files = weight_files([p.name for p in path.iterdir() if p.is_file()], fmt)
    if not files:
        raise ModelSourceError(f"{path}: no {fmt} weight files (.safetensors)")
    by_name: dict[str, TensorInfo] = {}
    for f in files:  # ExLlamaV2 maps each key to one file (the last one read); never count a key twice
        for t in read_safetensors_header(path / f):
            by_name.pop(t.name, None)
            by_name[t.name] = t
    tensors = list(by_name.values())
    check_tensor_table(tensors, name=str(path))
    bits, head_bits = quant_bits(config)
    if bits is None:
        bits, hb_name = bits_from_name(path.name)
        head_bits = head_bits if head_bits is not None else hb_name
    return Variant(
        format=fmt,
        label=variant_label(config, path.name),
        location=Location(kind="local", path=str(path), files=tuple(files)),
        config=config,
        tensors=tuple(tensors),
        bits=bits,
        head_bits=head_bits,
    )


def discover_local(path: Path) -> list[Variant]:
    """A model dir gives one variant; a dir of model dirs gives one per subdir (sorted by name)."""
    if not path.exists():
        raise ModelSourceError(f"{path}: no such file or directory")
    from optimizer.sources.gguf_local import discover_gguf, is_gguf_path

    if is_gguf_path(path):
        return discover_gguf(path)
    if not path.is_dir():
        raise ModelSourceError(f"{path}: not a directory")
    if (path / "config.json").exists():
        return [variant_from_dir(path)]
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").exists())
    if not subdirs:
        raise ModelSourceError(f"{path}: no config.json here or in any sub-directory")
    return [variant_from_dir(p) for p in subdirs]

"""Importance matrices for llama.cpp's quantizer: collected from the run's own data, or read from a file.

An importance matrix tells the quantizer which input columns of each weight
matrix matter: for every matrix ``W`` used as ``W @ x``, the mean of ``x_j²``
over the calibration tokens.  Rounding errors in columns that see large
activations cost more, so the quantizer weights its error by these numbers.
The i-quants below ~3 bits are unusable without one (llama.cpp refuses them)
and every K/i type gains from one.

llama.cpp computes it with a separate ``llama-imatrix`` program over a text
file.  tunelab already holds the merged model in float32 during an export, so
``--imatrix auto`` runs the run's own held-out examples through it with
forward hooks on the decoder blocks' linear layers (what ``llama-imatrix``
collects by default: ``blk.*`` matrices, not the output layer), and names each
entry as the GGUF names the matrix.  The matrix is written next to the export in
llama.cpp's GGUF imatrix layout (``<name>.in_sum2`` + ``<name>.counts``) so
``llama-quantize --imatrix`` can reuse it; ``--imatrix FILE`` reads that layout
or the older ``.dat`` one.  (Checked by hand with llama-quantize built from the
llama.cpp that llama-cpp-python 0.3.36 vendors: given a file written here, it
quantizes a tiny Llama to iq3_s, iq2_xs and q4_k_m byte for byte as
:func:`tunelab.export.gguf_kquant.quantize_file` does with the same matrix; and
over the same 64-token chunks of a float32 GGUF, llama-imatrix's means and
:func:`collect`'s agree within 0.15% for every matrix.)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ConfigError, ModelError

MAX_TOKENS = 32_768  # calibration budget: llama.cpp's own default is ~100 chunks of 512 tokens
CHUNK = 512  # tokens per forward pass, llama-imatrix's default context
_MIN_ROWS = 16  # llama-imatrix skips matmuls over fewer tokens than this; so does tunelab (short prompts)


@dataclass(frozen=True)
class Calibration:
    """Token sequences to run through the merged model, and what they are (recorded in the imatrix file)."""

    sequences: tuple[tuple[int, ...], ...]
    dataset: str


@dataclass
class Imatrix:
    """Per GGUF weight name: the sum of squared inputs per column, and over how many tokens."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunks: int = 0
    chunk_size: int = 0
    source: str = ""  # where it came from, for the export's notes

    def means(self) -> dict[str, np.ndarray]:
        """What the quantizer takes: mean squared input per column (1 where no token was seen)."""
        return {
            name: (s / self.counts[name]).astype(np.float32) if self.counts[name] > 0 else np.ones_like(s)
            for name, s in self.sums.items()
        }

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)


def collect(model: Any, config: dict[str, Any], calibration: Calibration) -> Imatrix:
    """Run ``calibration`` through the transformers ``model`` and sum each block matrix's squared inputs."""
    import gguf
    import torch

    from tunelab.export.gguf import family_of

    arch = getattr(gguf.MODEL_ARCH, family_of(config).arch)
    names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    found = Imatrix(datasets=[calibration.dataset], source=f"{calibration.dataset}, collected now")
    handles = []
    for module_name, module in model.named_modules():
        target = names.get_name(f"{module_name}.weight", (".weight",)) if module_name else None
        if isinstance(module, torch.nn.Linear) and target is not None and target.startswith("blk."):
            handles.append(module.register_forward_pre_hook(_accumulator(found, target)))
    if not handles:
        raise ModelError(f"found no decoder-block matrices to calibrate in this {config.get('model_type')} model")
    chunks = _chunks(calibration.sequences)
    if not chunks:
        raise ConfigError(
            f"the calibration data ({calibration.dataset}) has fewer than {_MIN_ROWS} tokens",
            hint="give --imatrix FILE, or more held-out examples",
        )
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    found.chunks, found.chunk_size = len(chunks), CHUNK
    return found


def _chunks(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """The examples as one token stream cut into CHUNK-token pieces, up to MAX_TOKENS (as llama-imatrix reads
    its text file); a last piece shorter than _MIN_ROWS is dropped, as llama-imatrix skips such matmuls."""
    stream = [int(t) for ids in sequences for t in ids][:MAX_TOKENS]
    pieces = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    return [p for p in pieces if len(p) >= _MIN_ROWS]


def _accumulator(found: Imatrix, target: str) -> Any:
    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        squares = (x * x).sum(0).numpy()
        found.sums[target] = found.sums.get(target, 0.0) + squares
        found.counts[target] = found.counts.get(target, 0) + int(x.shape[0])

    return hook


def write(imatrix: Imatrix, path: Path) -> Path:
    """Save in llama.cpp's GGUF imatrix layout (what ``llama-imatrix`` writes and ``llama-quantize`` reads)."""
    import gguf

    writer = gguf.GGUFWriter(path, "imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", imatrix.datasets or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", imatrix.chunks)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        writer.add_tensor(f"{name}.in_sum2", imatrix.sums[name].astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[imatrix.counts[name]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path: Path) -> Imatrix:
    """An imatrix file written by ``llama-imatrix`` (GGUF, or the older ``.dat``) or by tunelab."""
    if not path.is_file():
        raise ConfigError(f"--imatrix {path}: no such file", hint="give an imatrix file, or --imatrix auto")
    with path.open("rb") as fh:
        magic = fh.read(4)
    try:
        found = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError) as exc:
        raise ConfigError(
            f"--imatrix {path} is not an importance matrix llama.cpp writes ({exc})",
            hint="give a file from llama-imatrix (.gguf or .dat), or --imatrix auto",
        ) from None
    found.source = str(path)
    return found


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    found = Imatrix()
    field_ = reader.fields.get("imatrix.datasets")
    if field_ is not None:
        found.datasets = [str(v) for v in field_.contents()]
    for name, data in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors[f"{base}.counts"]
        if counts.size != 1:
            raise ValueError(f"{base} has per-expert counts; tunelab's GGUF families are dense")
        found.sums[base], found.counts[base] = data.astype(np.float64), round(float(counts[0]))
    if not found.sums:
        raise ValueError("no <name>.in_sum2 tensors")
    return found


def _read_dat(path: Path) -> Imatrix:
    """The legacy layout: entries of (name, ncall, values) where values are already sums / ncall * ncall."""
    raw = path.read_bytes()
    (n_entries,), pos = struct.unpack_from("<i", raw, 0), 4
    if n_entries < 1:
        raise ValueError("no entries")
    found = Imatrix()
    for _ in range(n_entries):
        (length,) = struct.unpack_from("<i", raw, pos)
        name = raw[pos + 4 : pos + 4 + length].decode("utf-8")
        pos += 4 + length
        ncall, nval = struct.unpack_from("<ii", raw, pos)
        pos += 8
        if nval < 1 or pos + 4 * nval > len(raw):
            raise ValueError(f"entry {name!r} is truncated")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        # llama-quantize divides by ncall; storing (values, ncall) as (sums, count) gives the same means.
        found.sums[name], found.counts[name] = values, max(ncall, 0) or 1
    return found


def check_against(imatrix: Imatrix, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Refuse a matrix made for another model (llama.cpp would stop half-way); notes on what it covers."""
    source = imatrix.source or "the given file"
    matrices = {name: shape for name, (_kind, shape) in tensors.items() if len(shape) == 2}
    covered = [name for name in imatrix.sums if name in matrices]
    if not covered:
        raise ConfigError(
            f"the importance matrix {source} names none of this model's tensors (e.g. {next(iter(imatrix.sums))})",
            hint="it was computed for another model: use --imatrix auto, or one made from this model",
        )
    for name in covered:
        if imatrix.sums[name].size != matrices[name][0]:
            raise ConfigError(
                f"the importance matrix {source} has {imatrix.sums[name].size} columns for {name}, "
                f"which has {matrices[name][0]} here",
                hint="it was computed for another model: use --imatrix auto, or one made from this model",
            )
    blocks = [name for name in matrices if name.startswith("blk.")]
    missing = len([name for name in blocks if name not in imatrix.sums])
    note = f"importance matrix from {source}: {len(covered)} of {len(blocks)} block matrices"
    note += f" ({imatrix.tokens:,} tokens)" if imatrix.tokens else ""
    return [note + (f"; {missing} without one" if missing else "")]


def calibration_from(sequences: Sequence[Sequence[int]], dataset: str) -> Calibration:
    """A :class:`Calibration` from token id lists (the held-out examples as training tokenized them)."""
    return Calibration(tuple(tuple(int(i) for i in s) for s in sequences), dataset)

"""`tunelab convert`: Hugging Face <-> MLX checkpoints, optionally quantized; GGUF files in (--to hf)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from tunelab.cli.console import console, err_console


def convert(
    src: str = typer.Argument(..., help="Checkpoint folder, hub id (owner/name), or a .gguf file (--to hf)."),
    to: str = typer.Option(..., "--to", help="mlx | hf"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (refused if it exists, unless --force)."),
    quantize: int | None = typer.Option(None, "--quantize", "-q", help="4 | 8 bits, MLX affine (--to mlx only)."),
    group_size: int = typer.Option(64, "--group-size", help="Weights per quantization group: 32 | 64 | 128."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float16 | bfloat16 | float32 for unquantized weights (default: the checkpoint's)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    no_verify: bool = typer.Option(False, "--no-verify", help="GGUF: skip comparing the result with llama.cpp."),
) -> None:
    """Convert a checkpoint to mlx-lm's layout (--to mlx) or back to transformers' (--to hf); a GGUF to --to hf."""
    from tunelab import services

    err_console.print(Text(f"converting {src} to {to}…"))
    if to == "hf" and quantize is None and services.is_gguf_model(src):
        _gguf(src, out, dtype=dtype, verify=not no_verify, force=force)
        return
    result = services.convert_checkpoint(
        src, out, to=to, bits=quantize, group_size=group_size, dtype=dtype, force=force
    )
    form = f"{result.bits}-bit affine, group size {result.group_size}" if result.bits else result.dtype or "as stored"
    console.print(Text.assemble(("wrote ", "green"), str(result.out), f" ({result.to}, {form})"))
    console.print(
        Text(
            f"  {result.model_type}: {result.params / 1e6:.2f}M parameters, "
            f"{_size(result.bytes_written)} on disk, {result.seconds:.1f} s"
        )
    )
    if result.dequantized_bits:
        console.print(Text(f"  dequantized {result.dequantized_bits}-bit weights to {result.dtype}"))
    if result.copied:
        console.print(Text(f"  carried over: {', '.join(result.copied)}"))
    for note in result.notes:
        console.print(Text.assemble(("  note: ", "yellow"), note))


def _gguf(src: str, out: Path, *, dtype: str | None, verify: bool, force: bool) -> None:
    """A GGUF model in as a transformers checkpoint, checked against llama.cpp running the file."""
    from tunelab import services

    result = services.import_gguf(src, out, dtype=dtype, verify=verify, force=force)
    console.print(Text.assemble(("wrote ", "green"), str(result["folder"]), f" (hf, {result['dtype']})"))
    console.print(Text(f"  {result['model_type']}: {result['params'] / 1e6:.2f}M parameters, from {result['gguf']}"))
    for note in result["notes"]:
        console.print(Text.assemble(("  note: ", "yellow"), note))
    report = result["report"]
    if report is None:
        console.print(Text.assemble(("  not verified", "yellow"), " (--no-verify)"))
        return
    console.print(
        Text(
            f"  verified against llama.cpp: max logit diff {report['max_logit_diff']:.3g} "
            f"({report['relative_logit_diff']:.3%}), greedy agreement {report['greedy_agreement']:.1%}, "
            f"tokenization {'same' if report['tokenization_match'] else 'differs'}"
        )
    )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"

"""`tunelab export RUN_ID --to … --out …`: merge, write, verify, record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from tunelab.cli.console import console, err_console
from tunelab.cli.export_report import fail_on_drops, print_table
from tunelab.errors import ConfigError


def export(
    run: str = typer.Argument(..., help="Run id (or a unique prefix of one)."),
    to: str = typer.Option(..., "--to", help="hf | mlx | gguf | ollama | onnx | coreml | gguf-adapter | mlx-adapter"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (a .gguf file for --to gguf)."),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        "-q",
        help="gguf/ollama: f32 | f16 | bf16 | q8_0 | q4_0, a K-quant q2_k | q3_k_m | q4_k_s | q4_k_m | "
        "q5_k_s | q5_k_m | q6_k, or an i-quant iq4_xs | iq4_nl | iq3_m | iq3_s | iq3_xs | iq3_xxs | iq2_m | "
        "iq2_s | iq2_xs | iq2_xxs | iq1_m | iq1_s (llama.cpp's quantizer; from iq3_xs down with --imatrix; "
        "default f16, bf16 for a bf16 base); mlx: 4 | 8; coreml: float32 | float16.",
    ),
    imatrix: str | None = typer.Option(
        None,
        "--imatrix",
        help="K/i-quants: weight the rounding by an importance matrix: auto (collected from the run's held-out "
        "examples, saved beside a --to gguf file) or FILE (from llama-imatrix, .gguf or .dat).",
    ),
    adapter_only: bool = typer.Option(
        False, "--adapter-only", help="ollama: write the LoRA adapter GGUF and a Modelfile with FROM <base> + ADAPTER."
    ),
    base: str | None = typer.Option(
        None, "--base", help="With --adapter-only: the Modelfile's FROM (an Ollama model name or a .gguf path)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip loading the export in its runtime to check it."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    evaluate: bool = typer.Option(
        False,
        "--eval",
        help="Then answer the run's held-out examples with the export and with the run (the reference), "
        "and print both side by side (hf, gguf, onnx, mlx; gguf-adapter and mlx-adapter over the run's base).",
    ),
    data: str | None = typer.Option(None, "--data", help="With --eval: held-out examples (default: data.valid)."),
    metrics: str = typer.Option("exact_match", "--metrics", help="With --eval: comma-separated metric names."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="With --eval: only the first N examples."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="With --eval: longest answer."),
    max_drop: float | None = typer.Option(
        None,
        "--max-drop",
        min=0.0,
        help="With --eval: fail (exit 8) when the export's metric or greedy agreement falls more than this "
        "below the run's; the export is then kept but not recorded.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Merge a run's adapter into its base, export it, and prove the export behaves like the merged model."""
    from tunelab import services

    if not evaluate and (max_drop is not None or data is not None or limit is not None):
        raise ConfigError("--max-drop, --data and --limit go with --eval", hint="add --eval")
    err_console.print(Text(f"exporting run {run} to {to}…"))
    table = None
    if evaluate:
        if adapter_only:
            raise ConfigError("--eval scores a whole model, not an adapter-only export", hint="drop one of them")
        result, table = services.export_and_evaluate(
            run, to=to, out=out, quantize=quantize, verify=not no_verify, force=force, data=data,
            metrics=metrics.split(","), limit=limit, max_new_tokens=max_new_tokens, max_drop=max_drop, imatrix=imatrix,
            on_stage=lambda text: err_console.print(Text(text)),
        )  # fmt: skip
    else:
        result = services.export_run(
            run, to=to, out=out, quantize=quantize, verify=not no_verify, force=force, adapter_only=adapter_only,
            base=base, imatrix=imatrix,
        )  # fmt: skip
    if as_json:
        fields = {"target": result.target, "path": str(result.path), "precision": result.precision}
        extra = {"eval": table.to_dict()} if table is not None else {}
        typer.echo(json.dumps({**fields, "sha256": result.sha256, "report": result.report, "notes": result.notes,
                               **extra}))  # fmt: skip
    else:
        _show(result, to)
        if table is not None:
            print_table(table)
    if table is not None:
        fail_on_drops(table, unrecorded=str(result.path))


def _show(result: Any, to: str) -> None:
    console.print(Text.assemble(("wrote ", "green"), str(result.path), f" ({to}, {result.precision})"))
    console.print(Text(f"  sha256 {result.sha256}, {result.seconds:.1f} s"))
    for note in result.notes:
        console.print(Text.assemble(("  note: ", "yellow"), note))
    report = result.report
    if report is None:
        console.print(Text.assemble(("  not verified", "yellow"), " (--no-verify)"))
        return
    if report.get("logits_skipped"):
        console.print(Text.assemble(("  logits not compared: ", "yellow"), report["logits_skipped"]))
    template = {None: "n/a (no chat template)", True: "same tokens", False: "differs"}[report["template_match"]]
    console.print(
        Text(
            f"  verified: max logit diff {report['max_logit_diff']:.3g} "
            f"({report['relative_logit_diff']:.3%}), greedy agreement {report['greedy_agreement']:.1%} "
            f"over {report['positions']} positions, tokenization "
            f"{'same' if report['tokenization_match'] else 'differs'}, template {template}"
        )
    )

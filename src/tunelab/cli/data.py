"""`tunelab data validate`."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from tunelab.cli.console import console

app = typer.Typer(help="Check datasets before training.", no_args_is_help=True)


@app.command("validate")
def validate(
    path: str = typer.Argument(..., help="A JSONL/JSON/CSV/Parquet file, or a folder with train/valid files."),
    fmt: str = typer.Option("auto", "--format", help="auto | text | completion | instruction | chat"),
    model: str | None = typer.Option(None, help="Checkpoint folder or hub id: adds token-length statistics."),
    max_seq_len: int = typer.Option(1024, help="Length that sequences are truncated to."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run the checks training runs on a dataset and print counts, format and lengths."""
    from tunelab.config.schema import DataCfg
    from tunelab.data.validate import validate_dataset
    from tunelab.errors import ConfigError

    allowed = DataCfg.model_fields["format"].annotation.__args__  # type: ignore[union-attr]
    if fmt not in allowed:
        raise ConfigError(f"--format must be one of {', '.join(allowed)} (got {fmt!r})")
    report = validate_dataset(path, fmt=fmt, model=model, max_seq_len=max_seq_len)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(f"[green]ok[/]: format [bold]{report['format']}[/]")
    table = Table("split", "file", "records", "min", "mean", "p95", "max", "supervised tokens", "truncated")
    for name, split in report["splits"].items():
        stats = split.get("tokens")
        if stats:
            table.add_row(
                name,
                split["path"],
                str(split["records"]),
                str(stats["min"]),
                f"{stats['mean']:.1f}",
                f"{stats['p95']:.0f}",
                str(stats["max"]),
                str(stats["supervised_tokens"]),
                str(stats["truncated"]),
            )
        else:
            table.add_row(name, split["path"], str(split["records"]), *["-"] * 6)
    console.print(table)
    if "chat_template" in report:
        console.print(f"chat template: {report['chat_template']}")
    elif model is None:
        console.print("pass --model PATH to see token lengths with that model's tokenizer")

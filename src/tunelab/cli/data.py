"""`tunelab data validate`, `tunelab data preview` and `tunelab data cache`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tunelab.cli.console import console
from tunelab.vocab import DATA_FORMATS, TRAIN_ON

app = typer.Typer(help="Check datasets before training.", no_args_is_help=True)

FORMATS = " | ".join(DATA_FORMATS)
TRAIN_ON_TEXT = " | ".join(TRAIN_ON)

# Options both commands share, declared once.
PathArg = Annotated[
    str, typer.Argument(help="A JSONL/JSON/CSV/Parquet/Arrow/HDF5 file, a folder with train/valid files, or a hub id.")
]
FormatOpt = Annotated[str, typer.Option("--format", help=FORMATS)]
TrainOnOpt = Annotated[str, typer.Option("--train-on", help=f"chat turns that carry loss: {TRAIN_ON_TEXT}")]
MaxLenOpt = Annotated[int, typer.Option("--max-seq-len", help="Length that sequences are truncated to.")]
MaskOpt = Annotated[bool, typer.Option("--mask-prompt/--no-mask-prompt", help="Train only on answers.")]
ColumnOpt = Annotated[
    list[str] | None,
    typer.Option("--column", "-c", help="Map a field: tunelab_field=your_field (repeat), e.g. -c prompt=question."),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Hub datasets / dataset folders: the split to read.")]
SubsetOpt = Annotated[str | None, typer.Option("--subset", help="Hub datasets / dataset folders: the subset.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

# Trained tokens are bold on green, masked ones dim; neighbours alternate shades so boundaries show.
_TRAINED = ("bold black on green3", "bold black on dark_sea_green2")
_MASKED = ("dim on grey15", "dim on grey27")


@app.command("validate")
def validate(
    path: PathArg,
    fmt: FormatOpt = "auto",
    model: Annotated[str | None, typer.Option(help="Checkpoint folder or hub id: adds token statistics.")] = None,
    max_seq_len: MaxLenOpt = 1024,
    train_on: TrainOnOpt = "all_assistant",
    mask_prompt: MaskOpt = True,
    column: ColumnOpt = None,
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the checks training runs on a dataset; print counts, lengths, truncation and duplicates."""
    from tunelab import services

    columns = _options(fmt, train_on, column)
    report = services.validate_dataset(
        path,
        fmt=fmt,
        model=model,
        max_seq_len=max_seq_len,
        mask_prompt=mask_prompt,
        train_on=train_on,
        columns=columns,
        split=split,
        subset=subset,
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print_validation(report.to_dict(), max_seq_len, with_model=model is not None)


@app.command("cache")
def cache(
    clear: Annotated[bool, typer.Option("--clear", help="Delete every cached tokenized dataset.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the tokenized datasets cached under TUNELAB_HOME/cache/tokenized (or delete them with --clear)."""
    from tunelab import services

    if clear:
        cleared = services.clear_cache()
        typer.echo(
            json.dumps(cleared.to_dict())
            if as_json
            else f"removed {cleared.removed} entries, {cleared.bytes / 2**20:.1f} MiB"
        )
        return
    entries = services.cache_entries()
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    total = sum(e.size_bytes for e in entries) / 2**20
    table = Table("key", "rows", "size", title=f"{services.cache_root()} ({total:.1f} MiB)")
    for e in entries:
        rows = ", ".join(f"{k} {v}" for k, v in e.rows.items()) if e.rows is not None else "incomplete"
        table.add_row(e.key, rows, f"{e.size_bytes / 2**20:.1f} MiB")
    console.print(table)


@app.command("preview")
def preview(
    path: PathArg,
    model: Annotated[str, typer.Option(help="Checkpoint folder or hub id whose tokenizer and template to use.")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many examples to show.")] = 3,
    fmt: FormatOpt = "auto",
    max_seq_len: MaxLenOpt = 1024,
    train_on: TrainOnOpt = "all_assistant",
    mask_prompt: MaskOpt = True,
    column: ColumnOpt = None,
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the first examples exactly as the trainer sees them: trained tokens highlighted, the rest dimmed."""
    from tunelab import services

    columns = _options(fmt, train_on, column)
    result = services.preview_dataset(
        path,
        model=model,
        n=n,
        fmt=fmt,
        train_on=train_on,
        max_seq_len=max_seq_len,
        mask_prompt=mask_prompt,
        columns=columns,
        split=split,
        subset=subset,
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    console.print(f"format [bold]{result.format}[/], chat template: {result.chat_template}")
    if result.note:
        console.print(f"[yellow]{result.note}[/]", soft_wrap=True)
    console.print(Text.assemble("legend: ", ("trained", _TRAINED[0]), " ", ("masked", _MASKED[0])))
    for number, example in enumerate(result.examples, start=1):
        _print_example(number, example, max_seq_len)


def _options(fmt: str, train_on: str, column: list[str] | None) -> dict[str, str]:
    """Check the choice options (a clear ConfigError, not a traceback) and parse ``--column`` pairs."""
    from tunelab.errors import ConfigError

    if fmt not in DATA_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(DATA_FORMATS)} (got {fmt!r})")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"--train-on must be one of {', '.join(TRAIN_ON)} (got {train_on!r})")
    columns: dict[str, str] = {}
    for pair in column or []:
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ConfigError(f"--column takes tunelab_field=your_field, e.g. prompt=question (got {pair!r})")
        columns[ours.strip()] = theirs.strip()
    return columns


def _print_validation(report: dict[str, Any], max_seq_len: int, *, with_model: bool) -> None:
    console.print(f"[green]ok[/]: format [bold]{report['format']}[/]")
    for name, split in report["splits"].items():
        console.print(f"{name}: {split['path']}", soft_wrap=True)
    table = Table("split", "records", "dups")
    if with_model:
        for title in ("min", "mean", "p95", "max", "trained tokens", "truncated"):
            table.add_column(title, justify="right")
    for name, split in report["splits"].items():
        row = [name, str(split["records"]), str(split["duplicates"]["count"])]
        stats = split.get("tokens")
        if stats and stats.get("count"):
            row += [str(stats["min"]), f"{stats['mean']:.1f}", f"{stats['p95']:.0f}", str(stats["max"])]
            row += [str(stats["supervised_tokens"]), str(stats["truncated"])]
        elif with_model:
            row += ["-"] * 4 + ["0", str(stats["truncated"] if stats else 0)]
        table.add_row(*row)
    console.print(table)
    for name, split in report["splits"].items():
        if "histogram" in split:
            _print_histogram(name, split["histogram"], split["tokens"], max_seq_len)
        _print_duplicates(name, split["duplicates"])
    if "chat_template" in report:
        console.print(f"chat template: {report['chat_template']}")
    elif not with_model:
        console.print("pass --model PATH to see token lengths, a length histogram and truncation")


def _print_histogram(name: str, bins: list[dict[str, Any]], stats: dict[str, Any], max_seq_len: int) -> None:
    used = [i for i, b in enumerate(bins) if b["count"]]
    if not used:
        return
    shown = bins[used[0] : used[-1] + 1]
    peak = max(b["count"] for b in shown)
    console.print(f"\n[bold]{name}[/]: tokens per example (before truncation at {max_seq_len})")
    for b in shown:
        label = f"{b['low']}-{b['high']}" if b["high"] is not None else f">{max_seq_len}"
        bar = "█" * max(1 if b["count"] else 0, round(30 * b["count"] / peak))
        style = "red" if b["high"] is None else "cyan"
        console.print(Text.assemble(f"{label:>13} ", (f"{bar:<30}", style), f" {b['count']}"))
    if stats.get("truncated"):
        console.print(f"[yellow]{stats['truncated']} example(s) exceed {max_seq_len} tokens and will be cut[/]")
    if stats.get("dropped"):
        console.print(f"[yellow]{stats['dropped']} example(s) have nothing left to train and will be skipped[/]")


def _print_duplicates(name: str, dups: dict[str, Any]) -> None:
    if dups["count"]:
        pairs = ", ".join(f"line {d['line']} = line {d['same_as']}" for d in dups["first"])
        more = " …" if dups["count"] > len(dups["first"]) else ""
        console.print(f"[yellow]{name}: {dups['count']} exact duplicate(s)[/] ({pairs}{more})")
    if dups.get("also_in_train"):
        console.print(f"[yellow]{name}: {dups['also_in_train']} example(s) also appear in train[/]")


def _print_example(number: int, example: Any, max_seq_len: int) -> None:
    cut = f"truncated from {example.full_length} to {max_seq_len}" if example.truncated else "not truncated"
    note = ", [red]dropped: nothing to train[/]" if example.dropped else ""
    console.print(
        f"\n[bold]example {number}[/] ({example.path}:{example.line}): "
        f"{example.total} tokens, {example.trained} trained, {cut}{note}",
        soft_wrap=True,
    )
    line = Text()
    for index, (text, _id, trained) in enumerate(example.tokens):
        styles = _TRAINED if trained else _MASKED
        # Make invisible characters visible while keeping line breaks where the model sees them.  A token
        # holding only the first bytes of a character has no text: the character shows on the next token.
        shown = text.replace("\t", "→").replace("\n", "↵\n")
        line.append(shown, style=styles[index % 2])
    console.print(line, soft_wrap=True)  # the terminal wraps; Rich must not re-flow the model's text

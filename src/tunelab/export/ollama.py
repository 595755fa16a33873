"""The ``ollama`` target: the GGUF plus a Modelfile whose TEMPLATE and stops match training.

Ollama formats prompts with a Go template, not the Jinja chat template inside
the GGUF.  tunelab knows the Go equivalent of the common chat formats
(ChatML, Llama 3); which one applies is found by rendering probe
conversations with the training template and with each Go template (through
the small Go-template interpreter below) and keeping the one that renders
identically.  A template that matches none is refused, since a Modelfile with
the wrong format is exactly the export that "loads but talks garbage".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError
from tunelab.export.imatrix import Imatrix
from tunelab.export.merge import Merged
from tunelab.export.pipeline import Written


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as Ollama spells it: Go template, stop strings, and whether BOS comes from the runtime."""

    name: str
    template: str
    stops: tuple[str, ...]
    bos_from_runtime: bool = False


FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat(
        "chatml",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    ChatFormat(
        "llama3",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos_from_runtime=True,
    ),
)
PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "Name two colours."},
    ),
    ({"role": "user", "content": "One question only"},),
)


def write(folder: Path, merged: Merged, out: Path, quantize: str | None, *, imatrix: Imatrix | None = None) -> Written:
    """Write ``out/model.gguf`` and ``out/Modelfile``; verification renders the Modelfile's TEMPLATE."""
    from tunelab.export import gguf

    if merged.template is None:
        raise ModelError("the run has no chat template, so there is no Ollama TEMPLATE to write", hint="use --to gguf")
    fmt = match_format(merged.tokenizer, merged.template)
    out.mkdir(parents=True, exist_ok=True)
    inner = gguf.write(folder, merged, out / "model.gguf", quantize, imatrix=imatrix)
    (out / "Modelfile").write_text(modelfile(fmt, "model.gguf"), encoding="utf-8")
    return Written(
        out,
        inner.precision,
        inner.runtime,
        render=lambda messages: render_modelfile(out / "Modelfile", messages, merged.tokenizer),
        notes=[*inner.notes, f"Modelfile TEMPLATE: {fmt.name}"],
    )


def jinja_render(tokenizer: Any, template: str, messages: Sequence[dict[str, str]]) -> str:
    """The training template's rendering, ending on an open assistant turn."""
    out = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    return str(out)


def match_format(tokenizer: Any, template: str) -> ChatFormat:
    """The known format whose Go template renders every probe exactly as ``template`` does."""
    for fmt in FORMATS:
        if all(jinja_render(tokenizer, template, p) == _with_bos(fmt, tokenizer, p) for p in PROBES):
            return fmt
    raise ModelError(
        "the run's chat template matches none of the formats tunelab can write as an Ollama TEMPLATE "
        f"({', '.join(f.name for f in FORMATS)})",
        hint="export --to gguf and write the Modelfile's TEMPLATE yourself",
    )


def _with_bos(fmt: ChatFormat, tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    text = render_go(fmt.template, {"Messages": list(messages)})
    return (tokenizer.bos_token or "") + text if fmt.bos_from_runtime else text


def modelfile(fmt: ChatFormat, gguf_name: str, *, adapter: str | None = None) -> str:
    """Modelfile text: FROM (and ADAPTER), TEMPLATE and one PARAMETER stop line per stop string.

    ``gguf_name`` is a file beside the Modelfile, or (with an ``adapter``) any base Ollama can
    name: a model in its store ("smollm2:135m") or a path.
    """
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in fmt.stops)
    base = f"./{gguf_name}" if "/" not in gguf_name and gguf_name.endswith(".gguf") else gguf_name
    adapter_line = f"ADAPTER ./{adapter}\n" if adapter else ""
    return f'FROM {base}\n{adapter_line}TEMPLATE """{fmt.template}"""\n{stops}'


def render_modelfile(path: Path, messages: Sequence[dict[str, str]], tokenizer: Any) -> str:
    """Render the TEMPLATE written in a Modelfile, adding BOS where the runtime would."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    if match is None:
        raise ModelError(f"{path} has no TEMPLATE")
    fmt = next((f for f in FORMATS if f.template == match.group(1)), None)
    rendered = render_go(match.group(1), {"Messages": list(messages)})
    return (tokenizer.bos_token or "") + rendered if fmt is not None and fmt.bos_from_runtime else rendered


# --------------------------------------------------------------------------- a small Go-template interpreter

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def render_go(template: str, data: dict[str, Any]) -> str:
    """Render the subset of Go's text/template that chat templates use.

    Supported: text, ``{{ .Field }}``, ``{{ range .List }}…{{ end }}``,
    ``{{ if .Field }}`` / ``{{ if eq .Field "x" }}`` with ``{{ else }}``, and the
    ``{{-``/``-}}`` whitespace trims.  Anything else raises, rather than
    rendering something Ollama would not.
    """
    nodes, rest = _parse(_lex(template), 0)
    if rest != len(_lex(template)):
        raise ModelError("unbalanced {{ end }} in a Go template")
    return "".join(_eval(nodes, data))


def _lex(template: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if parts and parts[-1][0] == "trim":
            parts.pop()
            text = text.lstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2)))
        if m.group(3):
            parts.append(("trim", ""))
        pos = m.end()
    tail = template[pos:]
    if parts and parts[-1][0] == "trim":
        parts.pop()
        tail = tail.lstrip()
    parts.append(("text", tail))
    return parts


def _parse(tokens: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    """Nodes up to a closing ``end``/``else`` (which is left for the caller)."""
    nodes: list[Any] = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
        elif value in ("end", "else"):
            return nodes, i
        elif value.startswith(("range ", "if ")):
            body, i = _parse(tokens, i + 1)
            other: list[Any] = []
            if tokens[i][1] == "else":
                other, i = _parse(tokens, i + 1)
            nodes.append((value.split()[0], value.split(None, 1)[1], body, other))
        else:
            nodes.append(("value", value))
        i += 1
    return nodes, i


def _lookup(expr: str, scope: dict[str, Any]) -> Any:
    if not expr.startswith("."):
        raise ModelError(f"unsupported Go template expression {expr!r}")
    return scope.get(expr[1:].capitalize()) if expr[1:] else scope


def _truth(expr: str, scope: dict[str, Any]) -> bool:
    words = expr.split(None, 2)
    if words[0] == "eq" and len(words) == 3:
        return str(_lookup(words[1], scope)) == words[2].strip().strip('"')
    return bool(_lookup(expr, scope))


def _eval(nodes: list[Any], scope: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(str(_lookup(node[1], scope) or ""))
        elif node[0] == "range":
            for item in _lookup(node[1], scope) or []:
                out.extend(_eval(node[2], {k.capitalize(): v for k, v in item.items()}))
        else:
            out.extend(_eval(node[2] if _truth(node[1], scope) else node[3], scope))
    return out

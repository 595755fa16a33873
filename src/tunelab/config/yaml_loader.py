"""A YAML loader with YAML 1.2 scalars and no silent duplicate keys.

PyYAML follows YAML 1.1, where ``1e-4`` is a string, ``no`` is ``False`` and
``010`` is octal 8 — all surprising in a config file or an override.  This
loader resolves only ``true``/``false`` as booleans, decimal integers, and
floats with or without a dot, and refuses a key given twice in one mapping
(the last one silently winning hides mistakes).

Anchors and aliases are bounded: PyYAML builds an alias as a shared reference,
so a few lines of nested aliases ("billion laughs") cost nothing to parse but
expand into billions of items as soon as anything walks the value (validation,
an error message, saving the config).  The document is composed first and its
expanded size measured on the node graph before any Python object exists.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
# Dates stay strings too: a run name like 2024-01-01 must not become a date object.
_REPLACED = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
}


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping holds the same key twice."""


MAX_ALIASES = 100
"""Aliases one document may use; a config needs a handful at most."""
MAX_EXPANDED = 1_000_000
"""Nodes plus scalar characters a document may hold once every alias is expanded."""


class ExpansionError(yaml.MarkedYAMLError):
    """A document whose aliases expand too far, or refer to themselves, or that nests too deeply."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars, duplicate-key detection and bounded aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ExpansionError(f"more than {MAX_ALIASES} aliases (*name); write the values out instead", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        return str(self.construct_scalar(node)).lower() == "true"

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        return int(str(self.construct_scalar(node)))

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = str(self.construct_scalar(node)).lower()
        if text.endswith("inf"):
            return float("-inf") if text.startswith("-") else float("inf")
        return float("nan") if text.endswith("nan") else float(text)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
ConfigLoader.add_constructor("tag:yaml.org,2002:bool", ConfigLoader.construct_yaml_bool)
ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)
ConfigLoader.add_constructor("tag:yaml.org,2002:float", ConfigLoader.construct_yaml_float)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`ConfigLoader`; :class:`ExpansionError` for an alias bomb."""
    return load_yaml_lines(text)[0]


def load_yaml_lines(text: str) -> tuple[Any, dict[str, int]]:
    """Parse like :func:`load_yaml`, and also say on which line (1-based) each dotted key was written.

    A composed config merges several files; the lines let a validation error name the file and
    line a bad value came from, presets included.
    """
    loader = ConfigLoader(text)  # safe: ConfigLoader derives from SafeLoader
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        if loader._aliases:
            _check_expansion(node)
        lines: dict[str, int] = {}
        _key_lines(node, "", lines)
        return loader.construct_document(node), lines
    except RecursionError:
        raise ExpansionError("the document nests too deeply (hundreds of levels)") from None
    finally:
        loader.dispose()


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    """Record ``dotted key -> line`` for every mapping key under ``node`` (aliases are walked once)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        dotted = f"{prefix}{key_node.value}"
        if dotted in out:
            continue
        out[dotted] = key_node.start_mark.line + 1
        _key_lines(value_node, dotted + ".", out)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand past :data:`MAX_EXPANDED` or form a cycle."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ExpansionError("an alias refers to the collection it is inside of (a cycle)", node.start_mark)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.ScalarNode):
            total += len(node.value)
        else:
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
            for child in children:
                total = min(total + size(child), MAX_EXPANDED + 1)  # capped: the sum stays a small number
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if size(root) > MAX_EXPANDED:
        raise ExpansionError(
            f"its aliases (*name) expand it to more than {MAX_EXPANDED:,} items and characters; "
            "write the values out instead of repeating anchors",
            root.start_mark,
        )

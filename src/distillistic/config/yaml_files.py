"""YAML config and sweep files, read within bounds: one clear error for a missing, malformed or oversized file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from distillistic.errors import UserError

# Bounds of a config or sweep file: its size, its nodes once every alias is expanded, and its nesting.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 20


class YamlTooLarge(ValueError):
    """A YAML document beyond :data:`MAX_YAML_NODES` expanded nodes or :data:`MAX_YAML_DEPTH` levels."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that measures the composed document before building any Python object: a
    300-byte alias bomb (each level repeating the previous one) is refused in microseconds."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, {}, 0)
        return node


def _expanded_size(node: Any, memo: dict[int, tuple[int, int]], depth: int) -> tuple[int, int]:
    """(nodes, height) of ``node`` with every alias expanded, memoised per node (aliases share nodes)."""
    if id(node) in memo:
        size, height = memo[id(node)]
    else:
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        size, height = 1, 0
        for child in children:
            if depth + 1 > MAX_YAML_DEPTH:
                raise YamlTooLarge(f"nested deeper than {MAX_YAML_DEPTH} levels")
            child_size, child_height = _expanded_size(child, memo, depth + 1)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise YamlTooLarge(f"more than {MAX_YAML_NODES} values once its aliases are expanded")
        memo[id(node)] = (size, height)
    if depth + height > MAX_YAML_DEPTH:
        raise YamlTooLarge(f"nested deeper than {MAX_YAML_DEPTH} levels")
    return size, height


def safe_load_bounded(text: str) -> Any:
    """``yaml.safe_load`` within :data:`MAX_YAML_NODES` and :data:`MAX_YAML_DEPTH` (raises YamlTooLarge)."""
    return yaml.load(text, Loader=_BoundedLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one clear error for a missing, unreadable, malformed or oversized file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' does not exist; check the path")
    try:
        if p.stat().st_size > MAX_YAML_BYTES:
            raise UserError(f"config file '{p}' is larger than {MAX_YAML_BYTES >> 20} MiB; a config is a few "
                            "lines of key: value")
        data = safe_load_bounded(p.read_text(encoding="utf-8"))
    except YamlTooLarge as e:
        raise UserError(f"config file '{p}' is too large: {e}; write the values out plainly") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        tag = re.search(r"tag '([^']+)'", str(getattr(e, "problem", "")))
        if isinstance(e, yaml.constructor.ConstructorError) and tag:
            raise UserError(f"config file '{p}' uses the YAML tag {tag.group(1)}{where}, which safe loading refuses "
                            "(it could run code); write plain values") from None
        raise UserError(f"config file '{p}' is not valid YAML{where}; fix its syntax") from None
    except OSError as e:
        raise UserError(f"config file '{p}' cannot be read ({e.strerror}); check its permissions") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}' must hold a mapping of key: value, not {type(data).__name__}")
    return data

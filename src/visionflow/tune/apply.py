"""`vflow tune --apply`: the best trial's params into params.yaml, nothing else.

ruamel.yaml reads the file with the position of every node; only the text of the tuned
values is replaced (a key params.yaml lacks is added at the end of its section), so every
other byte, comments and formatting included, stays as it was. The result must load to the
best params (a preset that sets a tuned key would override it: one line, nothing written).
"""

from __future__ import annotations

import difflib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError
from visionflow.core.files import write_text


def _flow_value(value: Any) -> str:
    """A scalar as YAML 1.1 reads it back (PyYAML: `1.0e-05`, not `1e-05`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _lookup(root: MappingNode, key: str) -> tuple[Node | None, Node | None]:
    """(key node, value node) of `key` in a mapping node (None, None when absent)."""
    for k, v in root.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return k, v
    return None, None


def _last_leaf(node: Node) -> Node:
    """The last scalar (or flow collection) of a block collection: where its text ends
    (a block node's own end mark lies past the comments that follow it)."""
    while isinstance(node, MappingNode | SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, MappingNode) else last
    return node


def rewrite(text: str, updates: dict[str, Any]) -> str:
    """`text` with each dotted key of `updates` set; every other byte unchanged."""
    root = YAML().compose(io.StringIO(text))
    if root is not None and not isinstance(root, MappingNode):
        raise ConfigError("params.yaml: top level must be a mapping")
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) on the original text
    appended: dict[str, list[str]] = {}  # sections params.yaml lacks
    for dotted, value in updates.items():
        section, name = dotted.split(".", 1)
        _, node = _lookup(root, section) if root is not None else (None, None)
        if node is None:
            appended.setdefault(section, []).append(f"  {name}: {_flow_value(value)}")
            continue
        if not isinstance(node, MappingNode) or node.flow_style:
            raise ConfigError(f"params.yaml: '{section}' is not a block mapping: set "
                              f"{dotted}={_flow_value(value)} by hand")
        key, old = _lookup(node, name)
        if old is not None:
            if not isinstance(old, ScalarNode):
                raise ConfigError(f"params.yaml: {dotted} is not a scalar: set it by hand")
            edits.append((old.start_mark.index, old.end_mark.index, _flow_value(value)))
            continue
        indent = " " * node.value[-1][0].start_mark.column
        end = text.find("\n", _last_leaf(node).end_mark.index)
        end = len(text) if end < 0 else end
        edits.append((end, end, f"\n{indent}{name}: {_flow_value(value)}"))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    for section, lines in appended.items():
        text = text.rstrip("\n") + f"\n\n{section}:\n" + "\n".join(lines) + "\n"
    return text


def unified_diff(old: str, new: str, name: str = "params.yaml") -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        f"a/{name}", f"b/{name}"))


def apply_best(params_path: Path, root: Path, best: dict[str, Any]) -> tuple[str, bool]:
    """Write `best` (dotted key -> value) into params.yaml; returns (the diff, changed).
    Checked before writing: the new file loads, and to exactly these values."""
    old = params_path.read_text()
    new = rewrite(old, best)
    if new == old:
        return "", False
    fd, name = tempfile.mkstemp(prefix=f".{params_path.name}.", suffix=".check",
                                dir=params_path.parent)  # a sibling: presets/ resolve alike
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.write_text(new)
        loaded = load_params(tmp, root=root).dump()
    finally:
        tmp.unlink(missing_ok=True)
    for dotted, value in best.items():
        section, key = dotted.split(".", 1)
        got = loaded[section][key]
        if got != value:
            raise ConfigError(f"{params_path.name}: {dotted} would load as {got!r}, not the "
                              f"tuned {value!r} (the preset sets it): apply it there")
    write_text(params_path, new)
    return unified_diff(old, new, params_path.name), True

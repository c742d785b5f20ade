"""The parts of tools/restructure.sh that need Python's parser (#21). Idempotent.

`imports FILE...`: `from visionflow.pkg import mod, other` where `mod` moved to another
package or got another name is split by new parent (`from new.pkg import new_mod`), and the
old local name is renamed at its uses in that file (or kept with `as old` where the file binds
that name otherwise). Plain dotted references are left to the perl pass of restructure.sh.

`contracts pyproject.toml`: import-linter sees flows/ and bench/ (root_packages), the layer
list gets `bench | flows` on top and `visionflow.tune | visionflow.stack` above
`visionflow.orchestration`, and two contracts are added once.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path("src")
# old module -> new module, most specific first (prefixes move their children)
MOVES = [
    ("visionflow.pipeline.tune.tracking", "visionflow.tune.mlflow_runs"),
    ("visionflow.pipeline.tune", "visionflow.tune"),
    ("visionflow.pipeline.stack", "visionflow.stack"),
    ("visionflow.pipeline.stages", "visionflow.orchestration.stage_runner"),
    ("visionflow.pipeline", "visionflow.orchestration"),
    ("visionflow.data.cache", "visionflow.data.packed"),
    ("visionflow.data.inspect", "visionflow.data.image_checks"),
    ("visionflow.mlops.pyfunc_model", "visionflow.mlops.pyfunc_classifier_entry"),
    ("visionflow.mlops.pyfunc", "visionflow.mlops.pyfunc_classifier"),
    ("visionflow.mlops.compact_pyfunc", "visionflow.mlops.pyfunc_compact_entry"),
    ("visionflow.mlops.compact_model", "visionflow.mlops.pyfunc_compact"),
    ("visionflow.mlops.pyfunc_segmentation_model", "visionflow.mlops.pyfunc_segmenter_entry"),
    ("visionflow.mlops.pyfunc_segmentation", "visionflow.mlops.pyfunc_segmenter"),
    ("visionflow.mlops.compact_segmentation_pyfunc",
     "visionflow.mlops.pyfunc_compact_segmenter_entry"),
    ("visionflow.mlops.compact_segmentation", "visionflow.mlops.pyfunc_compact_segmenter"),
]


def renamed(name: str) -> str:
    for old, new in MOVES:
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _bound_names(tree: ast.AST, skip: set[int]) -> set[str]:
    """Every name the file binds, except through the import nodes in `skip`."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names |= set(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _statement(indent: str, module: str, names: list[str]) -> str:
    line = f"{indent}from {module} import {', '.join(names)}"
    if len(line) <= 100:
        return line
    inner = "".join(f"{indent}    {n},\n" for n in names)
    return f"{indent}from {module} import (\n{inner}{indent})"


def rewrite_imports(path: Path) -> bool:
    text = path.read_text()
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    plans = []  # (node, [(new_parent, [alias text])], {old_leaf: new_leaf})
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] == "visionflow"):
            continue
        groups: dict[str, list[tuple[str, str | None, str]]] = {}
        changed = False
        for a in node.names:
            full = f"{node.module}.{a.name}"
            new_full = renamed(full)
            if new_full != full and is_module(new_full):
                parent, leaf = new_full.rsplit(".", 1)
            else:
                parent, leaf = renamed(node.module), a.name
            changed |= leaf != a.name
            groups.setdefault(parent, []).append((a.name, a.asname, leaf))
        if changed or len(groups) > 1:
            plans.append((node, groups))
    if not plans:
        return False
    skip = {id(node) for node, _ in plans}
    bound = _bound_names(tree, skip)
    lines = text.splitlines(keepends=True)
    uses: dict[str, str] = {}  # old local name -> new local name, renamed at every use
    edits = []
    for node, groups in plans:
        indent = " " * node.col_offset
        stmts = []
        for parent, names in groups.items():
            out = []
            for old, asname, leaf in names:
                if asname:
                    out.append(f"{leaf} as {asname}" if asname != leaf else leaf)
                elif leaf != old and old in bound:
                    out.append(f"{leaf} as {old}")
                else:
                    if leaf != old:
                        uses[old] = leaf
                    out.append(leaf)
            stmts.append(_statement(indent, parent, out))
        last = lines[node.end_lineno - 1]
        tail = last.encode()[node.end_col_offset:].decode()
        edits.append((node.lineno, node.end_lineno, "\n".join(stmts) + tail))
    # the old local names at their uses (ast positions: byte offsets)
    by_line: dict[int, list[tuple[int, int, str]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in uses:
            by_line.setdefault(node.lineno, []).append(
                (node.col_offset, node.end_col_offset, uses[node.id]))
    for lineno, spans in by_line.items():
        raw = lines[lineno - 1].encode()
        for start, end, new in sorted(spans, reverse=True):
            raw = raw[:start] + new.encode() + raw[end:]
        lines[lineno - 1] = raw.decode()
    for start, end, new in sorted(edits, reverse=True):
        lines[start - 1:end] = [new]
    path.write_text("".join(lines))
    return True


LAYERS_NAME_OLD = "cli > pipeline > stages"
LAYERS_NAME_NEW = "bench | flows > cli > tune | stack > orchestration > stages"
EXTRA = '''
[[tool.importlinter.contracts]]
name = "The search and the team stack are independent (both sit on orchestration)"
type = "independence"
modules = ["visionflow.tune", "visionflow.stack"]

[[tool.importlinter.contracts]]
name = "The package never imports the flows' entry files or the benchmarks"
type = "forbidden"
source_modules = ["visionflow"]
forbidden_modules = ["flows", "bench"]
'''


def contracts(path: Path) -> None:
    text = path.read_text()
    text = text.replace('root_package = "visionflow"',
                        'root_packages = ["visionflow", "flows", "bench"]')
    text = text.replace(LAYERS_NAME_OLD, LAYERS_NAME_NEW)
    head, sep, rest = text.partition('type = "layers"')
    if sep:
        block, end, after = rest.partition("]\n")
        if '"bench | flows"' not in block:
            block = block.replace('    "visionflow.cli",', '    "bench | flows",\n'
                                  '    "visionflow.cli",', 1)
        if '"visionflow.tune | visionflow.stack"' not in block:
            block = block.replace('    "visionflow.orchestration",',
                                  '    "visionflow.tune | visionflow.stack",\n'
                                  '    "visionflow.orchestration",', 1)
        text = head + sep + block + end + after
    if '"visionflow.tune", "visionflow.stack"' not in text:
        marker = '[[tool.importlinter.contracts]]\nname = "No import cycles'
        if marker in text:
            text = text.replace(marker, EXTRA.lstrip("\n") + "\n" + marker, 1)
        else:
            text = text.rstrip("\n") + "\n" + EXTRA
    path.write_text(text)


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "imports":
        for name in args:
            if name.endswith(".py") and rewrite_imports(Path(name)):
                print(f"restructure: imports rewritten in {name}")
    elif cmd == "contracts":
        contracts(Path(args[0]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

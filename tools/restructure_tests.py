"""Test helpers out of tests/conftest.py (#21), by name with ast. Idempotent.

conftest.py keeps its fixtures, pytest hooks, `pytest_plugins` and the private session setup
(`_SANDBOX` and the environment). Every other public top-level function or UPPER_CASE
constant moves, with its decorators and the comment lines right above it, to
tests/helpers.py; the imports they need come along, and `from conftest import ...` in every
test module becomes `from helpers import ...`. helpers.py imports nothing from visionflow at
its top, so the GPU machine (no DVC, MLflow, Prefect or pydantic) still collects.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path("tests")
CONFTEST = TESTS / "conftest.py"
HELPERS = TESTS / "helpers.py"
HELPERS_DOC = '''"""What the test modules share that is not a fixture: the repository and venv paths,
`run` (a command that must succeed), a fresh project (`make_project`, `write_params`, the
small `TINY` params) and Prefect settings for in-process flows. No tests, no fixtures here
(those stay in conftest.py)."""

from __future__ import annotations
'''


def _is_fixture_or_hook(node: ast.AST) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if node.name.startswith("pytest_"):
            return True
        for d in node.decorator_list:
            target = d.func if isinstance(d, ast.Call) else d
            if ast.unparse(target) in ("pytest.fixture", "fixture", "pytest.hookimpl"):
                return True
    return False


def _name(node: ast.AST) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) == 1 and isinstance(targets[0], ast.Name):
            return targets[0].id
    return None


def movable(node: ast.AST) -> str | None:
    name = _name(node)
    if name is None or name.startswith("_") or name == "pytest_plugins":
        return None
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and not name.isupper():
        return None
    return None if _is_fixture_or_hook(node) else name


def _span(node: ast.AST, lines: list[str]) -> tuple[int, int]:
    """0-based [start, end) lines of a node with its decorators and comments right above."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start, node.end_lineno


def _used_names(nodes: list[ast.AST]) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def _import_lines(tree: ast.Module, needed: set[str]) -> list[str]:
    """The module-level imports of `tree` that bind a name in `needed`, cut down to those."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            keep = [a for a in node.names if (a.asname or a.name.split(".")[0]) in needed]
            if keep:
                out.append(ast.unparse(ast.Import(names=keep)))
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            keep = [a for a in node.names if (a.asname or a.name) in needed]
            if keep:
                out.append(ast.unparse(ast.ImportFrom(node.module, keep, node.level)))
    return out


def _top_bound(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif (n := _name(node)) is not None:
            names.add(n)
    return names


def _insert_imports(text: str, imports: list[str]) -> str:
    """`imports` after the last top-level import (or the docstring) of `text`."""
    if not imports:
        return text
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    at = 0
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            at = node.end_lineno
        elif at == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            at = node.end_lineno
    lines[at:at] = [line + "\n" for line in imports]
    return "".join(lines)


def move_helpers() -> list[str]:
    text = CONFTEST.read_text()
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    moving = [(movable(n), n) for n in tree.body]
    moving = [(name, n) for name, n in moving if name]
    if not moving:
        return []
    names = [name for name, _ in moving]
    body, drop, prev_const = "", set(), False
    for _, node in moving:  # constants one after the other, two blank lines around defs
        start, end = _span(node, lines)
        const = isinstance(node, (ast.Assign, ast.AnnAssign))
        chunk = "".join(lines[start:end]).rstrip("\n")
        sep = "\n" if const and prev_const else "\n\n\n"
        body += (sep + ("\n" if sep == "\n" and chunk.startswith("#") else "")) if body else ""
        body += chunk
        drop |= set(range(start, end))
        prev_const = const
    kept = re.sub(r"\n{4,}", "\n\n\n",
                  "".join(line for i, line in enumerate(lines) if i not in drop))
    # helpers.py: the moved code and the imports it needs
    helpers = HELPERS.read_text() if HELPERS.exists() else HELPERS_DOC
    moved_nodes = [n for _, n in moving]
    needed = _used_names(moved_nodes) - _top_bound(ast.parse(helpers)) - set(names)
    helpers = _insert_imports(helpers, _import_lines(tree, needed))
    first_const = isinstance(moving[0][1], (ast.Assign, ast.AnnAssign))
    helpers = helpers.rstrip("\n") + ("\n\n" if first_const else "\n\n\n") + body + "\n"
    HELPERS.write_text(helpers)
    # conftest.py: what it still uses of the moved names comes from helpers
    kept_tree = ast.parse(kept)
    still = sorted(set(names) & _used_names(kept_tree.body))
    if still:
        kept = _insert_imports(kept, [f"from helpers import {', '.join(still)}"])
    CONFTEST.write_text(kept)
    return names


def rewrite_conftest_imports(moved: set[str]) -> list[Path]:
    changed = []
    for path in sorted(TESTS.rglob("*.py")):
        if path in (CONFTEST, HELPERS):
            continue
        text = path.read_text()
        if "conftest" not in text:
            continue
        tree = ast.parse(text)
        lines = text.splitlines(keepends=True)
        edits = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "conftest" and not node.level:
                go = [a for a in node.names if a.name in moved]
                if not go:
                    continue
                stay = [a for a in node.names if a.name not in moved]
                indent = " " * node.col_offset
                new = [f"{indent}{ast.unparse(ast.ImportFrom('helpers', go, 0))}"]
                if stay:
                    new.append(f"{indent}{ast.unparse(ast.ImportFrom('conftest', stay, 0))}")
                tail = lines[node.end_lineno - 1].encode()[node.end_col_offset:].decode()
                edits.append((node.lineno, node.end_lineno, "\n".join(new) + tail))
        for start, end, new in sorted(edits, reverse=True):
            lines[start - 1:end] = [new]
        if edits:
            path.write_text("".join(lines))
            changed.append(path)
    return changed


def helper_names() -> set[str]:
    if not HELPERS.exists():
        return set()
    return {n for n in (_name(node) for node in ast.parse(HELPERS.read_text()).body)
            if n and not n.startswith("_")}


def main() -> None:
    moved = move_helpers()
    if moved:
        print(f"restructure: moved from conftest.py to helpers.py: {', '.join(moved)}")
    changed = rewrite_conftest_imports(helper_names())
    for path in changed:
        print(f"restructure: `from conftest import` rewritten in {path}")
    ruff = Path(sys.executable).parent / "ruff"
    ruff_cmd = [str(ruff)] if ruff.exists() else ["ruff"]
    if moved:  # unused imports left in conftest.py, import order in both
        subprocess.run([*ruff_cmd, "check", "--quiet", "--select", "F401,I", "--fix",
                        str(CONFTEST), str(HELPERS)], check=False)
    if changed:
        subprocess.run([*ruff_cmd, "check", "--quiet", "--select", "I", "--fix",
                        *map(str, changed)], check=False)


if __name__ == "__main__":
    main()

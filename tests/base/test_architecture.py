"""The layers hold: import-linter's contracts, dvc.yaml deps that cover every module a stage
imports, module-top imports, modules small enough to read in one sitting, tests of one claim
(at most 80 lines)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO

from visionflow.core.config import STAGE_NAMES

PKG = REPO / "src" / "visionflow"
MAX_LINES = 420  # "about 400"
MAX_TEST_LINES = 80  # a longer test is two claims


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """visionflow modules `name` imports anywhere in its body, and their parent packages."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for mod in names:
            if not mod.startswith("visionflow"):
                continue
            while mod not in MODULES and "." in mod:
                mod = mod.rsplit(".", 1)[0]
            parts = mod.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)
    return found


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += _imports(mod) - seen
    return seen


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def test_import_contracts_hold():
    proc = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and proc.stdout.count("KEPT") >= 4


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_dvc_deps_cover_every_module_the_stage_imports(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    assert spec["cmd"] == f"python3 -m visionflow.stages.{stage}"
    deps = [REPO / d for d in spec["deps"] if isinstance(d, str) and d.startswith("src/")]
    assert PKG / "stages" / f"{stage}.py" in deps

    def covered(path: Path) -> bool:
        return any(path == d or path.is_relative_to(d) for d in deps)

    needed = {MODULES[m] for m in closure(f"visionflow.stages.{stage}")}
    missing = sorted(str(p.relative_to(REPO)) for p in needed
                     if _has_code(p) and not covered(p))
    assert not missing, f"dvc.yaml stage {stage}: add deps {missing}"
    unused = [str(d.relative_to(REPO)) for d in deps
              if not any(p == d or p.is_relative_to(d) for p in needed)]
    assert not unused, f"dvc.yaml stage {stage}: deps it does not import {unused}"


def test_a_model_change_reaches_exactly_the_model_stages():
    touched = [s for s in STAGE_NAMES
               if any(m.startswith("visionflow.model") for m in closure(f"visionflow.stages.{s}"))]
    assert touched == ["train", "evaluate", "compress", "register"]


def test_modules_are_small_and_import_at_the_top():
    long = {str(p.relative_to(REPO)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    local = []
    for path in PKG.rglob("*.py"):
        if path.parent.name == "cli":  # kept off the `vflow --help` path on purpose
            continue
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        local += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and id(n) not in top
                  and (n.module or "").startswith("visionflow")]
    assert not local, f"function-local visionflow imports: {local}"


def test_tests_are_short():
    long = [f"{p.relative_to(REPO)}::{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in (REPO / "tests").rglob("test_*.py")
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test")
            and n.end_lineno - n.lineno + 1 > MAX_TEST_LINES]
    assert not long, f"tests over {MAX_TEST_LINES} lines: {long}"

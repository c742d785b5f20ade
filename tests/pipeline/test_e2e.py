"""End to end in a temporary git+DVC repo: the Prefect flow and `dvc repro` on one project.
One notion of "up to date" (dvc.lock): after the flow `dvc repro` runs nothing and after
`dvc repro` the flow runs nothing; a params change reruns train, evaluate, compress and
register in DVC, a code change in model/ the same four in both drivers, and the two drivers
produce the same metrics for the same params. A DVC experiment run in a temporary copy
(`dvc exp run --temp`) registers into the project's store."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import yaml
from helpers import BIN, make_project, prefect_settings, run

STAGES = ("validate", "pack", "train", "evaluate", "compress", "register")
pytestmark = pytest.mark.slow


def _ran(stdout: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in stdout]


def _outputs(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in (root / "outputs").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_dvc_repro_and_prefect_flow(tmp_path: Path, digits_dir: Path, prefect_server: str):
    # a third of the digits and one compression method: the drivers' agreement is the point.
    # int8 loses about one top-1 point on this model (once 4 of 359 test images, 1.11 points,
    # over the 1-point default): a 5-point budget keeps it, so a promoted model has its compact.
    root = make_project(tmp_path / "proj", digits_dir,
                        {"data.limit_per_class": 60, "compress.methods": ["int8"],
                         "compress.max_top1_drop": 5.0}, git=True)
    dvc = str(BIN / "dvc")

    # The flow first (what `make run` does), in this process: all six stages, recorded in
    # dvc.lock, so `dvc repro` then runs nothing.
    flow_mod = runpy.run_path(str(root / "flows" / "retrain.py"))
    with prefect_settings(prefect_server):
        first = flow_mod["retrain"](root=str(root))
    assert first["stages"] == dict.fromkeys(STAGES, "ran")
    again = run([dvc, "repro"], root)
    assert _ran(again.stdout) == [], again.stdout
    assert "up to date" in again.stdout.lower()

    dvc_files, dvc_metrics, dvc_version = _commit_then_change_params(root, dvc)

    with prefect_settings(prefect_server):
        cached = flow_mod["retrain"](root=str(root))
        assert cached["stages"] == dict.fromkeys(STAGES, "cached")  # dvc repro, then nothing
        assert cached["version"] == dvc_version and _outputs(root) == dvc_files

        # A code change in model/: DVC and the flow agree on exactly which stages it touches.
        zoo = root / "src" / "visionflow" / "model" / "zoo.py"
        zoo.write_text(zoo.read_text() + "\n# an edit\n")
        stale = json.loads(run([dvc, "status", "--json"], root).stdout)
        assert sorted(stale) == sorted(["train", "evaluate", "compress", "register"]), stale
        result = flow_mod["retrain"](root=str(root))
    assert result["stages"] == {"validate": "cached", "pack": "cached", "train": "ran",
                                "evaluate": "ran", "compress": "ran", "register": "ran"}
    after_flow = run([dvc, "repro"], root)  # the flow recorded what it ran in dvc.lock
    assert _ran(after_flow.stdout) == [], after_flow.stdout
    assert _outputs(root) == dvc_files
    flow_metrics = json.loads((root / "outputs/evaluate/metrics.json").read_text())
    assert flow_metrics["top1"] == pytest.approx(dvc_metrics["top1"])
    assert flow_metrics["f1_macro"] == pytest.approx(dvc_metrics["f1_macro"])

    _assert_registry_versions(root, result)
    _assert_a_queued_experiment_registers_here(root, dvc, result["model_name"])


def _commit_then_change_params(root: Path, dvc: str) -> tuple[dict, dict, str]:
    """Commit the run the DVC way, change a param, `dvc repro`: the metrics and plots diffs
    against the commit; returns (outputs, metrics, registered version) after it."""
    # Commit the run the DVC way: dvc.lock, metrics and plots in git, cached outs not.
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "first run"], root)
    tracked = set(run(["git", "ls-files"], root).stdout.split())
    assert {"dvc.lock", "outputs/evaluate/metrics.json", "outputs/evaluate/confusion.csv",
            "outputs/evaluate/confusion.png"} <= tracked
    assert not {"outputs/train/model.pt", "outputs/pack/packed.pt"} & tracked

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run([dvc, "repro"], root)
    assert _ran(third.stdout) == ["train", "evaluate", "compress", "register"], third.stdout
    # each stage ends in one line of its result; MLflow's per-run INFO lines are not shown
    printed = third.stdout + third.stderr
    ends = [line for line in printed.splitlines() if " done: " in line]
    assert [line.split()[0] for line in ends] == list(STAGES[2:]), printed[-3000:]
    assert "top1=" in ends[1] and not any("{" in line for line in ends), ends
    assert "INFO mlflow" not in printed, printed[-3000:]

    # Against the commit: every metric key on both sides (stable keys), and the change shows.
    diff = json.loads(run([dvc, "metrics", "diff", "--all", "--json"], root).stdout)
    evaluated = diff["outputs/evaluate/metrics.json"]
    assert "top1" in evaluated and "f1_macro" in evaluated and "miou" in evaluated
    # scalars and one IoU a class: a class's other numbers are the per_class.csv plot
    per_class = [k for k in evaluated if "." in k]
    assert sorted(per_class) == sorted(f"iou_per_class.{c}" for c in range(10)), per_class
    assert all(v["old"] is not None and v["new"] is not None for v in evaluated.values())
    assert any(v["diff"] for v in evaluated.values()), evaluated
    plots = json.loads(run([dvc, "plots", "diff", "--json"], root).stdout)["data"]
    confusion = plots["outputs/evaluate/confusion.csv"][0]
    assert set(confusion["revisions"]) == {"workspace", "HEAD"}
    assert {v["rev"] for v in confusion["content"]["data"]["values"]} == {"workspace", "HEAD"}

    metrics = run([dvc, "metrics", "show", "--json"], root)
    assert "top1" in metrics.stdout
    # results only: validate's report is an out, not a column per leaf in `dvc metrics show`
    shown = json.loads(metrics.stdout)[""]["data"]
    assert sorted(shown) == ["outputs/compress/metrics.json", "outputs/evaluate/metrics.json"]
    compressed = diff["outputs/compress/metrics.json"]  # a dozen columns, on both sides
    assert "recommended.top1" in compressed and len(compressed) <= 12, compressed
    assert all(v["old"] is not None and v["new"] is not None for v in compressed.values())
    dvc_files = _outputs(root)
    dvc_metrics = json.loads((root / "outputs/evaluate/metrics.json").read_text())
    dvc_version = json.loads((root / "outputs/register/registration.json").read_text())["version"]
    return dvc_files, dvc_metrics, dvc_version


def _assert_registry_versions(root: Path, result: dict) -> None:
    # Registry: the first model (the flow's) promoted (no champion yet), then the 1-epoch
    # model (twice: dvc, and the flow after the code edit) judged against it. A promoted
    # model also gets its `compact` version.
    from mlflow import MlflowClient

    from visionflow.core.layout import Layout
    from visionflow.mlops import tracking

    tracking.setup(Layout.at(root))
    client = MlflowClient()
    name = result["model_name"]
    every = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
    main = sorted((v for v, t in every.items() if "parent_version" not in t), key=int)
    compact = {v: t["parent_version"] for v, t in every.items() if "parent_version" in t}
    assert len(main) == 3 and result["version"] == main[-1]
    promoted = [v for v in main if every[v]["gate_decision"] == "promoted"]
    assert promoted[0] == main[0] and set(compact.values()) <= set(promoted)
    assert len(compact) == len(promoted)  # int8 is in the 5-point budget
    tags = every[main[-1]]
    # the last equals the one before (same params, deterministic): the champion is as good
    assert tags["gate_decision"] == "rejected", tags["gate_reason"]
    assert result["alias"] is None
    assert tags["lineage.data_hash"] and tags["lineage.params_hash"]
    assert len(tags["lineage.dvc_data_md5"]) == 32  # the hash data.dvc records
    assert tags["lineage.git_commit"]
    # lineage: every version, the compact ones too, says what data, code, params and
    # pipeline state it came from, and which images it learnt from
    for v, t in every.items():
        for key in ("data_hash", "git_commit", "params_hash", "dvc_lock_hash", "dvc_data_md5",
                    "split_scheme", "train_hashes"):
            assert t.get(f"lineage.{key}"), (v, key)
    for v, parent in compact.items():
        assert every[v]["lineage.train_hashes"] == every[parent]["lineage.train_hashes"]
        assert every[v]["lineage.data_hash"] == every[parent]["lineage.data_hash"]
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    assert champion in main[:2] and every[champion]["gate_decision"] == "promoted"
    compact_now = str(client.get_model_version_by_alias(name, "compact").version)
    assert compact[compact_now] == champion  # `compact` is a compressed copy of the champion


def _assert_a_queued_experiment_registers_here(root: Path, dvc: str, name: str) -> None:
    """`dvc exp run --temp` (and `--queue`) runs the stages in a copy under `.dvc/tmp/exps`:
    its register still judges against this project's champion, into this project's store
    (it registered into a store in the copy, deleted with it, and promoted: no champion)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    before = {v.version for v in client.search_model_versions(f"name='{name}'")}
    out = run([dvc, "exp", "run", "--temp", "-S", "register.min_test_images=31"], root)
    assert _ran(out.stdout) == ["register"], out.stdout
    new = [v for v in client.search_model_versions(f"name='{name}'") if v.version not in before]
    assert len(new) == 1, out.stdout[-2000:]
    assert "champion v" in new[0].tags["gate_reason"], new[0].tags["gate_reason"]

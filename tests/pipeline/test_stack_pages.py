"""The pages a team checks, on the session's team stack (its `flow_run`: v1 promoted, its
`compact` copy v2): what the MLflow server answers over REST (each version's own metrics,
the datasets with the data hash as digest, readable tags, full cards), then the same pages
in a real browser (Debian's Chromium driven by Playwright: the registered model, a version,
the run; the Prefect flow runs of a promoted and of a skipped run). Screenshots land in the
test's temp folder (VFLOW_SCREENSHOTS=DIR copies them there too)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import requests
from stack_fixtures import MODEL, TeamStack

pytestmark = [pytest.mark.stack, pytest.mark.slow]

LINEAGE_FOUR = ("lineage.data_hash", "lineage.git_commit", "lineage.params_hash",
                "lineage.dvc_lock_hash")
CARD_SECTIONS = ("## Data", "## Test metrics", "## Lineage", "Gate")
CHROMIUM = "/usr/bin/chromium"


def _get(ts: TeamStack, path: str, **params: Any) -> dict[str, Any]:
    res = requests.get(f"{ts.stack.url('mlflow')}/api/2.0/mlflow/{path}", params=params,
                       timeout=30)
    assert res.status_code == 200, (path, res.status_code, res.text[:300])
    return res.json()


def _version(ts: TeamStack, version: str) -> dict[str, Any]:
    return _get(ts, "model-versions/get", name=MODEL, version=version)["model_version"]


def _model_id(mv: dict[str, Any]) -> str:
    return mv.get("model_id") or mv["source"].removeprefix("models:/").split("/")[0]


def _model_metrics(ts: TeamStack, mv: dict[str, Any]) -> dict[str, float]:
    model = _get(ts, f"logged-models/{_model_id(mv)}")["model"]
    return {m["key"]: float(m["value"]) for m in model.get("data", {}).get("metrics", [])}


def _artifact_json(ts: TeamStack, run_id: str, path: str) -> dict[str, Any]:
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                   tracking_uri=ts.stack.url("mlflow"))
        return json.loads(Path(local).read_text())


@pytest.fixture(scope="module")
def pages(team_stack: TeamStack, flow_run) -> dict[str, Any]:
    """The registry as the REST API shows it after the session's flow run, plus a second
    run of the deployment with only_new_data (nothing new: skipped)."""
    ts = team_stack
    rm = _get(ts, "registered-models/get", name=MODEL)["registered_model"]
    aliases = {a["alias"]: a["version"] for a in rm.get("aliases", [])}
    assert {"champion", "compact"} <= set(aliases), aliases
    champion, compact = _version(ts, aliases["champion"]), _version(ts, aliases["compact"])
    skipped = ts.wait_final(ts.run_deployment("retrain/team", {"only_new_data": True}).id,
                            timeout=600)
    return {"ts": ts, "rm": rm, "aliases": aliases, "champion": champion,
            "compact": compact, "promoted": flow_run["flow_run"], "skipped": skipped}


def test_versions_carry_their_own_metrics_datasets_and_readable_tags(pages):
    ts, champion, compact = pages["ts"], pages["champion"], pages["compact"]
    run_id = champion["run_id"]
    evaluated = _artifact_json(ts, run_id, "evaluate/metrics.json")
    selected = _artifact_json(ts, run_id, "compress/compress.json")["selected"]
    mine, theirs = _model_metrics(ts, champion), _model_metrics(ts, compact)
    # each version's page metrics are its own model's: the parent's evaluate scores, the
    # compact copy's the compress stage's scores of the int8 variant
    assert mine["test/top1"] == pytest.approx(evaluated["top1"], abs=1e-6)
    assert theirs["test/top1"] == pytest.approx(selected["top1"], abs=1e-6)
    for key in set(mine) & set(theirs):
        if key.startswith("test/") and abs(evaluated.get(key[5:], -1) -
                                           selected.get(key[5:], -1)) > 1e-9:
            assert mine[key] != theirs[key], key  # not the parent's copied onto it
    assert not [k for k in theirs if k.startswith(("variants/", "curves/", "val/"))], theirs
    # the data: a dataset input whose digest is the data hash, on the run and the model
    data_hash = champion_tag(champion, "lineage.data_hash")
    run = _get(ts, "runs/get", run_id=run_id)["run"]
    by_context = {t["value"]: d["dataset"] for d in run["inputs"].get("dataset_inputs", [])
                  for t in d.get("tags", []) if t["key"] == "mlflow.data.context"}
    assert {"training", "evaluation"} <= set(by_context), by_context
    assert {d["digest"] for d in by_context.values()} == {data_hash}, by_context
    profile = json.loads(by_context["training"]["profile"])
    assert set(profile["splits"]) == {"train", "val", "test"} and profile["classes"] == 10
    assert set(json.loads(by_context["evaluation"]["profile"])["splits"]) == {"test"}
    # tags: flat, none empty, no JSON; the lineage four first, with one prefix
    for mv in (champion, compact):
        tags = [(t["key"], t.get("value", "")) for t in mv.get("tags", [])]
        assert all(v.strip() for _, v in tags), tags
        assert not [k for k, v in tags if v.strip()[:1] in "[{"], tags
        keys = [k for k, _ in tags]
        assert set(LINEAGE_FOUR) <= set(keys), keys
        assert all(champion_tag(mv, k) for k in LINEAGE_FOUR)
        # both cards: data, metrics, lineage and the gate, and a usage example for digits
        card = mv["description"]
        for section in CARD_SECTIONS:
            assert section in card, (mv["version"], section)
        assert "cat.png" not in card and "expect label" in card
    assert f"{theirs['test/top1']:.4f}" in compact["description"]
    assert "`compact`" in pages["rm"]["description"] and "`previous`" in pages["rm"][
        "description"]


def champion_tag(mv: dict[str, Any], key: str) -> str:
    return {t["key"]: t.get("value", "") for t in mv.get("tags", [])}.get(key, "")


def test_flow_runs_name_their_outcome(pages):
    promoted, skipped = pages["promoted"], pages["skipped"]
    assert promoted.state.name == "Promoted", promoted.state
    assert re.match(r"promoted v\d+: top-1 0\.\d{4}", promoted.state.message or ""), \
        promoted.state.message
    assert "promoted" in promoted.tags
    assert skipped.state.is_completed() and skipped.state.name == "Skipped", skipped.state
    assert (skipped.state.message or "").startswith("skipped: no new data"), \
        skipped.state.message
    assert "skipped" in skipped.tags
    ts = pages["ts"]
    summary, table = _artifacts(ts, promoted.id)
    for shown in ("**Outcome:** promoted v", "| new data? |", "@compact (model card)](",
                  "(model card)](", "MLflow run "):
        assert shown in summary, shown
    assert not re.search(r"\| dvc md5 \(data.dvc\) \| - \|", summary), summary
    assert "| | |" not in summary and "n_test" not in summary and "iou[" not in summary
    assert table and {row["metric"] for row in table} <= {
        "top1", "top3", "top5", "f1_macro", "f1_weighted", "miou", "ece"}, table
    summary, _ = _artifacts(ts, skipped.id)
    assert "**Outcome:** skipped: no new data" in summary and "## Champion (unchanged)" in \
        summary, summary
    assert re.search(r"\| dvc md5 \(data.dvc\) \| `[0-9a-f]{32}` \|", summary), summary


def _artifacts(ts: TeamStack, flow_run_id) -> tuple[str, list[dict[str, Any]]]:
    """The run's `retrain-summary` markdown and `retrain-metrics` table rows."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with ts.prefect() as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a.data for a in found}
    table = by_key.get("retrain-metrics")
    table = json.loads(table) if isinstance(table, str) else table
    return by_key.get("retrain-summary") or "", list(table or [])


# ------------------------------------------------------------------------- a real browser


def _browser_or_skip():
    """Playwright driving Debian's Chromium; skipped (with the reason) where it cannot be
    installed (not root, no apt), failed under VFLOW_REQUIRE_STACK=1 (CI, `make test`)."""
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        why, sync_playwright = f"playwright not installed ({err})", None
    if why is None and not Path(CHROMIUM).is_file():
        why = f"{CHROMIUM} missing (apt-get install chromium; `make system-deps` as root)"
    if why is None:
        return sync_playwright
    if os.environ.get("VFLOW_REQUIRE_STACK") == "1":
        pytest.fail(f"browser test required (VFLOW_REQUIRE_STACK=1) but: {why}")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(f"browser test: {why}; run `make system-deps`")
    pytest.skip(f"browser test: {why}")


def _open(page, url: str, wait_for: str, shots: Path, name: str) -> str:
    page.goto(url)
    try:
        page.get_by_text(wait_for, exact=False).first.wait_for(timeout=90_000)
    except Exception:  # what the page shows instead, next to the test's failure
        page.screenshot(path=str(shots / f"{name}-failed.png"), full_page=True)
        (shots / f"{name}-failed.txt").write_text(page.inner_text("body"))
        raise
    assistant = page.get_by_role("button", name="Close", exact=True)  # MLflow's chat panel
    if assistant.count():
        assistant.first.click()
    page.wait_for_timeout(1500)  # late tables and charts
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    text = page.inner_text("body")
    (shots / f"{name}.txt").write_text(text)
    return text


def _near(text: str, label: str, value: float, tol: float = 6e-4) -> bool:
    """Whether a number within `tol` of `value` follows `label` in the visible text."""
    for m in re.finditer(re.escape(label), text):
        for num in re.findall(r"\d\.\d+", text[m.end():m.end() + 120])[:2]:
            if abs(float(num) - value) <= tol:
                return True
    return False


def test_pages_in_a_real_browser(pages, tmp_path):
    """What a person sees: the registered model (aliases explained, lineage first in the
    versions' tags), each version (aliases, lineage tags, the card with its own top-1), its
    logged model (its own metrics, the dataset digest), the run (dataset, description), and
    the Prefect flow runs of a promoted and a skipped run (the outcome in the runs list)."""
    sync_playwright = _browser_or_skip()
    ts, champion, compact = pages["ts"], pages["champion"], pages["compact"]
    mlflow_ui, prefect_ui = ts.stack.url("mlflow"), ts.stack.url("prefect")
    data_hash = champion_tag(champion, "lineage.data_hash")
    run = _get(ts, "runs/get", run_id=champion["run_id"])["run"]
    exp = run["info"]["experiment_id"]
    shots = tmp_path
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless=new", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            text = _open(page, f"{mlflow_ui}/#/models/{MODEL}", "Aliases:", shots, "model")
            for shown in ("champion: the serving model", "previous: the version",
                          "compact: a compressed copy", f"Version {champion['version']}",
                          f"Version {compact['version']}"):
                assert shown in text, shown
            first = text.index(f"Version {compact['version']}")  # its row shows lineage tags
            assert "lineage." in text[first:first + 1500], text[first:first + 1500]
            for mv, alias, name in ((champion, "champion", "version"),
                                    (compact, "compact", "compact")):
                own = _model_metrics(ts, mv)["test/top1"]
                text = _open(page, f"{mlflow_ui}/#/models/{MODEL}/versions/{mv['version']}",
                             "lineage.data_hash", shots, name)
                assert re.search(rf"@\s*{alias}\b", text), (name, alias)
                assert _near(text, "top1", own), (name, own)  # the card: its own top-1
                for key in LINEAGE_FOUR:
                    assert key in text and champion_tag(mv, key) in text, (name, key)
                text = _open(page, f"{mlflow_ui}/#/experiments/{exp}/models/{_model_id(mv)}",
                             "Datasets used", shots, f"{name}-model")
                assert _near(text, "test/top1", own), (name, own)  # its logged model's
                assert data_hash[:8] in text, f"{name}: no dataset digest"
            text = _open(page, f"{mlflow_ui}/#/experiments/{exp}/runs/{champion['run_id']}",
                         "visionflow pipeline run", shots, "run")
            assert data_hash[:8] in text, "the run page shows no dataset digest"
            # the data-quality report renders inside MLflow's artifact viewer (offline)
            _open(page, f"{mlflow_ui}/#/experiments/{exp}/runs/{champion['run_id']}/artifacts/"
                        "data/data_docs/data_quality.html", "data_quality.png", shots,
                  "data-quality")
            page.wait_for_timeout(2000)
            framed = [f.inner_text("body") for f in page.frames if f != page.main_frame]
            assert any("Expectations (Great Expectations)" in t and data_hash in t
                       for t in framed), framed
            page.screenshot(path=str(shots / "data-quality.png"), full_page=True)
            for fr, outcome in ((pages["promoted"], "Promoted"), (pages["skipped"], "Skipped")):
                _open(page, f"{prefect_ui}/runs/flow-run/{fr.id}", outcome, shots,
                      f"flow-run-{outcome.lower()}")
            text = _open(page, f"{prefect_ui}/runs", "Skipped", shots, "flow-runs")
            assert "Promoted" in text and "Skipped" in text, text[:2000]
        finally:
            browser.close()
            keep = os.environ.get("VFLOW_SCREENSHOTS")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                for f in shots.glob("*.*"):
                    shutil.copy(f, Path(keep) / f.name)

"""The champion gate on crafted paired predictions, and the registry state each decision
leaves in a real MLflow sqlite store (versions without artifacts: the gate only moves
tags and aliases); then rollback and manual promotion, in-process and through `vflow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from visionflow.core.config import RegisterConfig
from visionflow.mlops.gate import apply, decide, scored_set

N = 100


def correct(n_right: int, first: int = 0, n: int = N) -> list[bool]:
    """n images, `n_right` right starting at index `first`."""
    return [first <= i < first + n_right for i in range(n)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A project root whose mlruns/mlflow.db is a fresh MLflow store."""
    from visionflow.mlops import registry

    root = tmp_path_factory.mktemp("gate") / "proj"
    (root / "mlruns").mkdir(parents=True)
    registry.client_for(root).search_registered_models()  # creates the tables once
    return root


@pytest.fixture
def user(monkeypatch) -> str:
    for key in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(key, "alice")
    return "alice"


def new_versions(root: Path, name: str, count: int):
    from visionflow.mlops import registry

    client = registry.client_for(root)
    client.create_registered_model(name)
    for _ in range(count):
        client.create_model_version(name, source=(root / "none").as_uri())
    return client


def gate_into_registry(root: Path, name: str, decision, version: str):
    """What register.run does after logging the model: tags + alias move, under the lock."""
    from visionflow.mlops import registry

    client = registry.client_for(root)
    with registry.registry_lock(registry.tracking_uri(client)):
        return apply(client, name, version, decision, "champion", {"model": "crafted"})


def state(root: Path, name: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    from visionflow.mlops import registry

    client = registry.client_for(root)
    tags = {str(mv.version): dict(mv.tags) for mv in registry.all_versions(client, name)}
    return registry.alias_map(client, name), tags


# --------------------------------------------------------------------------- scenarios


def test_no_champion_yet(store: Path, user: str):
    d = decide(correct(70), None, RegisterConfig(min_top1=0.5))
    assert d.promote and d.reason == "no champion yet"
    assert d.challenger_top1 == pytest.approx(0.70)
    assert [c.name for c in d.checks] == ["floor"]
    new_versions(store, "m-first", 1)
    assert gate_into_registry(store, "m-first", d, "1") == "champion"
    aliases, tags = state(store, "m-first")
    assert aliases == {"champion": "1"}  # no `previous`: there was nothing before
    assert tags["1"]["gate_decision"] == "promoted"
    assert tags["1"]["gate_reason"] == "no champion yet"
    assert "floor: pass - top-1 0.7000 >= min_top1 0.5000" in tags["1"]["gate_checks"]
    assert tags["1"]["champion_action"] == "gate" and tags["1"]["model"] == "crafted"


def test_a_champion_that_cannot_be_scored_is_named_not_absent():
    note = "champion v3 takes other inputs (32px)"
    d = decide(correct(70), None, RegisterConfig(), note=note)
    assert d.promote and d.reason == note
    assert f"on 100 test images; {note}." in d.markdown("m", "4")
    assert "no champion yet" not in d.markdown("m", "4")
    assert "; no champion yet." in decide(correct(70), None, RegisterConfig()).markdown("m", "1")


def test_a_challenger_that_adds_classes_may_tie_on_the_others_but_not_lose():
    """Scored on the classes the champion knows: a tie promotes a challenger that also knows
    new classes (it serves more at no loss), a loss does not; without new classes a tie is
    still no reason to move the alias."""
    base = scored_set([f"h{i}" for i in range(N)], [], [])
    adds = base.of_classes([True] * N, ["cat"])
    tie = decide(correct(80), correct(80), RegisterConfig(), "1", scored=adds)
    assert tie.promote, tie.reason
    assert tie.reason.startswith("top-1 0.8000 on the classes the champion knows matches "
                                 "champion v1 0.8000")
    lose = decide(correct(79), correct(80), RegisterConfig(), "1", scored=adds)
    assert not lose.promote and lose.reason.endswith(
        "(top-1 0.7900 vs champion v1 0.8000 on the classes the champion knows): worse")
    same = decide(correct(80), correct(80), RegisterConfig(), "1", scored=base)
    assert not same.promote and same.reason.endswith("not an improvement")


def test_no_champion_but_below_the_floor():
    d = decide(correct(40), None, RegisterConfig(min_top1=0.5))
    assert not d.promote
    assert d.reason == "no champion yet, but top-1 0.4000 < min_top1 0.5000"


def test_clear_win(store: Path, user: str):
    # champion right on 0..59, challenger right on 0..79: b=20 discordant wins, c=0
    d = decide(correct(80), correct(60), RegisterConfig(min_delta=0.05, mcnemar=True, alpha=0.05),
               champion_version="1")
    assert d.promote, d.reason
    assert d.gain == pytest.approx(0.20)
    assert (d.only_challenger_right, d.only_champion_right) == (20, 0)
    assert d.mcnemar_p == pytest.approx(2 / 2**20)
    assert d.reason.startswith("top-1 0.8000 beats champion v1 0.6000 (gain +0.2000")
    client = new_versions(store, "m-win", 2)
    gate_into_registry(store, "m-win", decide(correct(60), None, RegisterConfig()), "1")
    assert gate_into_registry(store, "m-win", d, "2") == "champion"
    aliases, tags = state(store, "m-win")
    assert aliases == {"champion": "2", "previous": "1"}
    assert tags["2"]["gate_decision"] == "promoted"
    assert tags["2"]["gate_champion_version"] == "1"
    assert tags["2"]["gate_champion_top1"] == "0.600000"
    assert float(tags["2"]["gate_mcnemar_p"]) == pytest.approx(2 / 2**20)
    assert "mcnemar: pass" in tags["2"]["gate_checks"]
    assert tags["1"]["demoted_for"] == "2" and tags["1"]["demoted_action"] == "gate"
    history = json.loads(client.get_registered_model("m-win").tags["alias_history"])
    assert [(h["from"], h["to"]) for h in history] == [(None, "1"), ("1", "2")]


def test_tie_within_the_delta(store: Path, user: str):
    # +1 point over the champion, 2 needed
    d = decide(correct(61), correct(60), RegisterConfig(min_delta=0.02), champion_version="1")
    assert not d.promote
    assert [c.name for c in d.checks if not c.passed and c.required] == ["delta"]
    assert "gain +0.0100" in d.reason and "< min_delta 0.0200" in d.reason
    new_versions(store, "m-tie", 2)
    gate_into_registry(store, "m-tie", decide(correct(60), None, RegisterConfig()), "1")
    assert gate_into_registry(store, "m-tie", d, "2") is None
    aliases, tags = state(store, "m-tie")
    assert aliases == {"champion": "1"}
    assert tags["2"]["gate_decision"] == "rejected"
    assert tags["2"]["gate_reason"].startswith("kept champion v1: gain +0.0100")
    # an exact tie is never a win, even with min_delta 0
    same = decide(correct(60), correct(60), RegisterConfig(), champion_version="1")
    assert not same.promote and "not an improvement" in same.reason


def test_regression(store: Path, user: str):
    d = decide(correct(55), correct(60), RegisterConfig(), champion_version="1")
    assert not d.promote
    assert d.gain == pytest.approx(-0.05)
    assert "gain -0.0500" in d.reason and "not an improvement" in d.reason
    worse = decide(correct(40), correct(60), RegisterConfig(mcnemar=True), champion_version="1")
    assert "<= alpha 0.05, the champion's way (b=0" in worse.checks[-1].detail  # not a pass
    new_versions(store, "m-worse", 2)
    gate_into_registry(store, "m-worse", decide(correct(60), None, RegisterConfig()), "1")
    gate_into_registry(store, "m-worse", d, "2")
    aliases, tags = state(store, "m-worse")
    assert aliases == {"champion": "1"}
    assert tags["2"]["gate_decision"] == "rejected"
    assert tags["2"]["gate_challenger_top1"] == "0.550000"


def test_a_first_model_no_better_than_the_commonest_class_is_not_promoted():
    """A diverged ResNet (session 19's photos) answered one class, right on the third of the
    test images that are that class, and became champion: no champion to beat, floor 0.
    It must beat always answering the commonest class (`register.beat_majority`)."""
    d = decide(correct(34), None, RegisterConfig(), majority=0.34)
    assert not d.promote
    assert d.reason == ("no champion yet, but top-1 0.3400 <= 0.3400, what answering the "
                        "commonest test class always scores")
    assert decide(correct(35), None, RegisterConfig(), majority=0.34).promote
    off = decide(correct(34), None, RegisterConfig(beat_majority=False), majority=0.34)
    assert off.promote and [(c.name, c.required, c.passed) for c in off.checks] == [
        ("floor", True, True), ("majority", False, False)]
    beaten = decide(correct(34), correct(30), RegisterConfig(), champion_version="1",
                    majority=0.34)  # better than the champion, still no better than that
    assert not beaten.promote and "kept champion v1: top-1 0.3400 <= 0.3400" in beaten.reason
    assert "beat_majority=True" in beaten.tags()["gate_config"]


def test_non_significant_win_with_mcnemar(store: Path, user: str):
    # champion right on 0..59; challenger right on 0..58 and 60..62: b=3, c=1, gain +0.02
    challenger = [i < 59 or 60 <= i < 63 for i in range(N)]
    cfg = RegisterConfig(min_delta=0.01, mcnemar=True, alpha=0.05)
    d = decide(challenger, correct(60), cfg, champion_version="1")
    assert not d.promote
    assert d.gain == pytest.approx(0.02)
    assert (d.only_challenger_right, d.only_champion_right) == (3, 1)
    assert d.mcnemar_p == pytest.approx(2 * (1 + 4) / 16)  # 0.625
    assert "exact p=0.625 > alpha 0.05" in d.reason
    assert [c.name for c in d.checks if not c.passed] == ["mcnemar"]
    # the same numbers pass without the test: the McNemar check is what stops it
    off = decide(challenger, correct(60), RegisterConfig(min_delta=0.01), champion_version="1")
    assert off.promote and not off.checks[-1].required
    new_versions(store, "m-noise", 2)
    gate_into_registry(store, "m-noise", decide(correct(60), None, RegisterConfig()), "1")
    gate_into_registry(store, "m-noise", d, "2")
    aliases, tags = state(store, "m-noise")
    assert aliases == {"champion": "1"}
    assert tags["2"]["gate_decision"] == "rejected"
    assert tags["2"]["gate_mcnemar_p"] == "0.625"
    assert "mcnemar=True" in tags["2"]["gate_config"]


def test_floor_blocks_a_win():
    d = decide(correct(45), correct(30), RegisterConfig(min_top1=0.5), champion_version="1")
    assert not d.promote
    assert d.reason == "kept champion v1: top-1 0.4500 < min_top1 0.5000"


def test_report_lists_every_check_with_numbers():
    d = decide(correct(80), correct(60), RegisterConfig(min_delta=0.05, mcnemar=True),
               champion_version="1")
    md = d.markdown("m", "2")
    assert md.startswith("## Champion gate: PROMOTED")
    for needle in ("| floor | yes | pass |", "| delta | yes | pass | gain +0.2000",
                   "| mcnemar | yes | pass | exact p=", "champion v1, top-1 0.6000",
                   "`min_delta=0.05`"):
        assert needle in md, needle


def test_scored_set_leaves_out_what_either_model_trained_on():
    test = ["a", "b", "c", "d", "e"]
    s = scored_set(test, challenger=["e", "x"], champion=["a", "b", "e"])
    assert s.keep == [False, False, True, True, False]
    assert (s.n, s.excluded, s.challenger_trained, s.champion_trained) == (2, 3, 1, 2)
    assert s.text() == ("2 of 5 test images scored, 3 excluded (2 the champion trained or "
                        "validated on, 1 the challenger did)")
    unknown = scored_set(test, [], None, "champion v3 records no training-image hashes")
    assert unknown.n == 5 and unknown.text().endswith("; champion v3 records no "
                                                      "training-image hashes")


def test_too_few_test_images_left_refuses_and_nothing_moves(store: Path, user: str):
    test = [f"h{i}" for i in range(100)]
    scored = scored_set(test, [], test[:80])  # the champion trained on 80 of them
    # a clear win on the 20 left, but 20 < min_test_images: refused
    d = decide(correct(18, n=20), correct(5, n=20), RegisterConfig(min_test_images=30), "1",
               scored=scored)
    assert not d.promote and [c.name for c in d.checks] == ["test_images"]
    assert d.reason == ("refused: too few test images to judge: 20 test images left after "
                        "excluding 80 that the champion or the challenger trained on < "
                        "register.min_test_images=30")
    assert "20 of 100 test images scored, 80 excluded" in d.markdown("m", "2")
    new_versions(store, "m-few", 2)
    gate_into_registry(store, "m-few", decide(correct(60), None, RegisterConfig()), "1")
    assert gate_into_registry(store, "m-few", d, "2") is None
    aliases, tags = state(store, "m-few")
    assert aliases == {"champion": "1"}
    assert tags["2"]["gate_decision"] == "rejected"
    assert tags["2"]["gate_test_images"].startswith("20 of 100 test images scored, 80 excluded")
    # the same 20 with the minimum lowered: judged on them, McNemar on the reduced pairs
    ok = decide(correct(18, n=20), correct(5, n=20), RegisterConfig(min_test_images=20), "1",
                scored=scored)
    assert ok.promote and ok.n == 20 and (ok.only_challenger_right, ok.only_champion_right) \
        == (13, 0)


def test_unpaired_predictions_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        decide(correct(5, n=10), correct(5, n=11), RegisterConfig(), champion_version="1")


# --------------------------------------------------------------------------- rollback


def test_rollback_and_manual_promotion(store: Path, user: str):
    from visionflow.mlops import registry
    from visionflow.mlops.registry import RegistryError

    client = new_versions(store, "m-roll", 3)
    for v in ("1", "2"):
        gate_into_registry(store, "m-roll", decide(correct(60 + int(v)), None, RegisterConfig()), v)
    assert registry.alias_map(client, "m-roll") == {"champion": "2", "previous": "1"}

    old, new = registry.rollback(client, "m-roll", "v2 mislabels class 3")
    assert (old, new) == ("2", "1")
    aliases, tags = state(store, "m-roll")
    assert aliases == {"champion": "1", "previous": "2"}
    assert tags["1"]["champion_action"] == "rollback"
    assert tags["1"]["champion_by"] == user
    assert tags["1"]["champion_reason"] == "v2 mislabels class 3"
    assert tags["2"]["demoted_by"] == user and tags["2"]["demoted_action"] == "rollback"

    registry.rollback(client, "m-roll", "back to 3", to="3")
    assert registry.alias_map(client, "m-roll") == {"champion": "3", "previous": "1"}
    with pytest.raises(RegistryError, match="already has alias 'champion'"):
        registry.rollback(client, "m-roll", "again", to="v3")
    with pytest.raises(RegistryError, match=r"version 9 not found \(versions: 1, 2, 3\)"):
        registry.rollback(client, "m-roll", "nope", to="9")
    with pytest.raises(RegistryError, match="must not be empty"):
        registry.rollback(client, "m-roll", "  ")

    registry.promote(client, "m-roll", "@previous", "hand-picked")
    aliases, tags = state(store, "m-roll")
    assert aliases == {"champion": "1", "previous": "3"}
    assert tags["1"]["champion_action"] == "promote"
    history = registry.history(client, "m-roll")
    assert [h["action"] for h in history] == ["gate", "gate", "rollback", "rollback", "promote"]
    assert all(h["by"] == user for h in history[2:])


def test_models_cli_tables_and_rollback(store: Path, user: str, monkeypatch):
    from visionflow.cli.main import app

    monkeypatch.setenv("COLUMNS", "200")
    client = new_versions(store, "m-cli", 2)
    long_note = " ".join(f"w{i}" for i in range(120))  # 480 characters: compare shows it all
    client.set_model_version_tag("m-cli", "2", "note", long_note)
    gate_into_registry(store, "m-cli", decide(correct(60), None, RegisterConfig()), "1")
    gate_into_registry(store, "m-cli", decide(correct(70), correct(60), RegisterConfig(),
                                              champion_version="1"), "2")
    runner = CliRunner()
    base = ["--root", str(store), "--name", "m-cli"]

    res = runner.invoke(app, ["models", "list", *base])
    assert res.exit_code == 0, res.output
    assert "champion" in res.output and "previous" in res.output and "promoted" in res.output

    res = runner.invoke(app, ["models", "list", *base, "--json"])
    rows = json.loads(res.output)
    assert [(r["version"], r["aliases"], r["tags"]["gate_decision"]) for r in rows] == [
        ("2", ["champion"], "promoted"), ("1", ["previous"], "promoted")]

    res = runner.invoke(app, ["models", "show", "champion", *base])
    assert res.exit_code == 0, res.output
    assert "version 2" in res.output and "gate_reason" in res.output

    res = runner.invoke(app, ["models", "compare", "1", "2", *base])
    assert res.exit_code == 0, res.output
    assert "v1 (previous)" in res.output and "v2 (champion)" in res.output
    assert "gate_challenger_top1" in res.output
    assert " w119 " in res.output  # the tag's last word: no value cut short

    res = runner.invoke(app, ["models", "rollback", *base, "--reason", "bad canary"])
    assert res.exit_code == 0, res.output
    assert "rolled back v2 -> v1" in res.output and "alice" in res.output
    _, tags = state(store, "m-cli")
    assert tags["1"]["champion_reason"] == "bad canary"

    res = runner.invoke(app, ["models", "promote", "2", *base])  # --reason is required
    assert res.exit_code != 0


def test_models_list_reads_whole_at_80_columns(store: Path, user: str, monkeypatch):
    """Every cell whole in an 80-column terminal (rich cuts cells to "vers…" otherwise)."""
    from visionflow.cli.main import app

    monkeypatch.setenv("COLUMNS", "80")
    client = new_versions(store, "m-narrow-registry-name", 4)
    name = "m-narrow-registry-name"
    gate_into_registry(store, name, decide(correct(60), None, RegisterConfig()), "1")
    gate_into_registry(store, name, decide(correct(70), correct(60), RegisterConfig(),
                                           champion_version="1"), "2")
    for v, top1 in (("1", 0.6), ("2", 0.7), ("3", 0.69)):  # (older versions' metrics tag)
        client.set_model_version_tag(name, v, "metrics", json.dumps(
            {"top1": top1, "f1_macro": top1 - 0.01}))
        client.set_model_version_tag(name, v, "lineage.data_hash", "a5b079f87d32942d931f")
    client.set_model_version_tag(name, "3", "compact_variant", "int8_static_per_channel")
    client.set_registered_model_alias(name, "compact", "3")
    gate_into_registry(store, name, decide(correct(50), correct(70), RegisterConfig(),
                                           champion_version="2"), "4")
    res = CliRunner().invoke(app, ["models", "promote", "4", "--reason", "canary", "--root",
                                   str(store), "--name", name])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["models", "list", "--root", str(store), "--name", name])
    assert res.exit_code == 0, res.output
    out = res.output
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out, out
    for whole in ("champion", "previous", "compact", "promoted", "0.7000", "0.6900",
                  "a5b079f8", "f1_macro", "aliases"):
        assert whole in out, (whole, out)
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (
        ["4"], ["2"])}  # v4 rejected, then made champion by hand: it says so below
    lines = out.splitlines()
    under_v4 = lines[lines.index(rows["4"]) + 1]
    assert "rejected" in rows["4"] and under_v4.split() == ["by", "hand"], out
    assert "by hand" not in lines[lines.index(rows["2"]) + 1], out


def test_cli_error_is_one_line(store: Path):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vflow"), "models", "rollback", "--root", str(store),
         "--name", "m-first", "--reason", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("error: rollback: model 'm-first' has no 'previous' alias; "
                         "pass --to VERSION"), proc.stderr


def test_compact_follows_the_champion_moved_by_hand(store: Path, user: str):
    """`@compact` is the champion's compressed copy: a promote or rollback by hand points it
    at the new champion's copy, or removes it when there is none (it never serves a copy of
    another version)."""
    from visionflow.cli.main import app
    from visionflow.mlops import registry

    name = "m-compact"
    client = new_versions(store, name, 3)
    gate_into_registry(store, name, decide(correct(60), None, RegisterConfig()), "1")
    for k, v in {"compact_variant": "int8", "parent_version": "1"}.items():
        client.set_model_version_tag(name, "2", k, v)  # v2: v1's compressed copy
    client.set_registered_model_alias(name, "compact", "2")
    runner = CliRunner()
    base = ["--root", str(store), "--name", name]

    res = runner.invoke(app, ["models", "promote", "3", *base, "--reason", "canary ok"])
    assert "@compact removed from v2: v3 has no compressed copy" in res.output, res.output
    assert "compact" not in registry.alias_map(client, name)
    res = runner.invoke(app, ["models", "rollback", *base, "--reason", "v3 is worse"])
    assert "@compact -> v2, the compressed copy of v1" in res.output, res.output
    assert registry.alias_map(client, name) == {"champion": "1", "previous": "3", "compact": "2"}
    shown = runner.invoke(app, ["models", "show", "compact", *base])
    assert "gate: none - the compressed copy of v1, which the gate judged" in shown.output, \
        shown.output
    assert client.get_model_version(name, "2").tags["compact_alias"].startswith("set: ")


def test_a_promoted_model_without_a_compressed_copy_takes_compact_off_the_old_copy(
        store: Path, user: str, capsys):
    from visionflow.core.configfile import parse_params
    from visionflow.core.layout import Layout
    from visionflow.mlops import registry
    from visionflow.mlops.compact import register_compact

    name = "visionflow-classifier"  # parse_params({})'s register.model_name
    client = new_versions(store, name, 3)
    for k, v in {"compact_variant": "int8", "parent_version": "1"}.items():
        client.set_model_version_tag(name, "2", k, v)  # v2: v1's compressed copy
    client.set_registered_model_alias(name, "compact", "2")
    gate_into_registry(store, name, decide(correct(60), None, RegisterConfig()), "3")
    layout = Layout.at(store)
    layout.compress_report.parent.mkdir(parents=True, exist_ok=True)
    layout.compress_report.write_text('{"selected": null, "selected_reason": "none fits"}')
    assert register_compact(parse_params({}), layout, "3") is None
    assert "compact: @compact removed from v2: v3 has no compressed copy" in \
        capsys.readouterr().out
    assert registry.alias_map(client, name) == {"champion": "3"}

"""`vflow tune` without training: the `tune:` section's one-line errors (before any work),
the params.yaml rewrite of `--apply`, and the study's settings check."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, run

from visionflow.core.configfile import load_params, parse_params
from visionflow.core.errors import ConfigError
from visionflow.tune import study as studies
from visionflow.tune.apply import apply_best, rewrite
from visionflow.tune.space import baseline, fingerprint, fixed_settings
from visionflow.tune.study import redact


def _raw(space: dict) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tune"]["space"] = space
    return raw


@pytest.mark.parametrize(("space", "expected"), [
    ({"train.lrr": {"low": 0.1, "high": 1}}, "tune.space.train.lrr: unknown key 'train.lrr'"),
    ({"data.image_size": {"low": 8, "high": 16}}, "tune.space.data.image_size: only train.*"),
    ({"train.lr": {"low": 1.0, "high": 0.1}}, "low (1) must be below high (0.1)"),
    ({"train.lr": {"low": 0.0, "high": 1.0, "log": True}}, "a log range needs low > 0"),
    ({"train.lr": {"low": -1.0, "high": 1.0}}, "tune.space.train.lr.low=-1.0"),
    ({"train.batch_size": {"low": 8, "high": 64.5}}, "high=64.5: 'train.batch_size' is an int"),
    ({"train.model": {"low": 1, "high": 2}}, "'train.model' is not numeric: give choices"),
    ({"train.model": {"choices": ["resnet18", "vgg"]}}, "tune.space.train.model.choices='vgg'"),
    ({"train.lr": {"low": 0.1}}, "a range needs both low and high"),
    ({"train.lr": {"low": 0.1, "high": 1, "choices": [0.1]}}, "either choices or low/high"),
])
def test_bad_space_is_one_line_naming_the_key(space, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(_raw(space))
    msg = str(err.value)
    assert expected in msg and "\n" not in msg, msg


def test_cli_rejects_a_bad_space_before_any_work(tmp_path: Path):
    proj = tmp_path / "proj"
    proj.mkdir()
    text = (REPO / "params.yaml").read_text()
    (proj / "params.yaml").write_text(text)
    (proj / "data").mkdir()
    out = run([str(BIN / "vflow"), "tune", "-s", "tune.space={train.lr: {low: 2, high: 1}}"],
              proj, check=False)
    assert out.returncode == 2  # a config error
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tune.space.train.lr" in lines[0], out.stderr
    assert not (proj / ".cache").exists() and not (proj / "mlruns").exists()


def test_valid_space_kinds():
    params = parse_params(_raw({
        "train.lr": {"low": 0.01, "high": 1.0, "log": True},
        "train.batch_size": {"low": 16, "high": 128, "step": 16},
        "train.model": {"choices": ["resnet18", "alexnet"]},
        "augment.cutout": {"low": 0, "high": 8},
    }))
    assert set(params.tune.space) == {"train.lr", "train.batch_size", "train.model",
                                      "augment.cutout"}
    # the baseline holds only the current values that lie in the space
    base = baseline(params)
    assert base.get("train.lr") == params.train.lr
    assert ("train.model" in base) == (params.train.model in ("resnet18", "alexnet"))


PARAMS = """\
# the project's settings
seed: 0          # everything random derives from it

train:
  lr: 0.5        # peak learning rate
  weight_decay: 5.0e-4
  epochs: 4      # short

augment:
  flip: true     # horizontal flips
  # cutout off by default
"""


def test_rewrite_changes_only_the_tuned_values():
    new = rewrite(PARAMS, {"train.lr": 0.0123, "train.weight_decay": 1e-5,
                           "augment.cutout": 4})
    old_lines, new_lines = PARAMS.splitlines(), new.splitlines()
    assert new_lines[:4] == old_lines[:4]
    assert new_lines[4] == "  lr: 0.0123        # peak learning rate"
    assert new_lines[5] == "  weight_decay: 1.0e-05"
    assert new_lines[6:9] == old_lines[6:9]
    assert "  cutout: 4" in new_lines and "  # cutout off by default" in new_lines
    loaded = yaml.safe_load(new)
    assert loaded["train"]["weight_decay"] == 1e-5 and loaded["augment"]["cutout"] == 4
    assert loaded["augment"]["flip"] is True
    assert rewrite(new, {"train.lr": 0.0123}) == new  # idempotent


def test_apply_refuses_what_a_preset_overrides(tmp_path: Path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "p.yaml").write_text("train:\n  lr: 0.3\n")
    text = (REPO / "params.yaml").read_text().replace("\npreset: null ", "\npreset: p ", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match="train.lr would load as 0.3"):
        apply_best(path, tmp_path, {"train.lr": 0.01})
    assert path.read_text() == text  # nothing written
    diff, changed = apply_best(path, tmp_path, {"train.weight_decay": 1e-4})
    assert changed and "+  weight_decay: 0.0001" in diff
    assert load_params(path, root=tmp_path).train.weight_decay == 1e-4


def test_fingerprint_ignores_tuned_and_speed_keys():
    params = load_params(REPO / "params.yaml", root=REPO)
    settings = fixed_settings(params, "abc")
    assert "train.lr" not in settings and "train.threads" not in settings
    other = parse_params({**params.dump(), "train": {**params.dump()["train"], "threads": 7,
                                                      "lr": 0.01}})
    assert fingerprint(fixed_settings(other, "abc")) == fingerprint(settings)
    assert fingerprint(fixed_settings(params, "abd")) != fingerprint(settings)  # data


def test_redact_hides_the_password():
    assert redact("postgresql+psycopg://vf:s3cret@10.0.0.1:5432/optuna") == (
        "postgresql+psycopg://vf:***@10.0.0.1:5432/optuna")
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_sampler_and_pruner_follow_the_config():
    import optuna

    from visionflow.tune.study import pruner, sampler

    raw = _raw({"train.lr": {"low": 0.01, "high": 1.0, "log": True}})
    raw["train"]["epochs"] = 6
    for name, kind in (("median", optuna.pruners.MedianPruner),
                       ("hyperband", optuna.pruners.HyperbandPruner),
                       ("none", optuna.pruners.NopPruner)):
        raw["tune"]["pruner"] = name
        assert isinstance(pruner(parse_params(raw)), kind)
    raw["tune"].update(pruner="hyperband", min_epochs=2)
    band = pruner(parse_params(raw))
    assert (band._min_resource, band._max_resource) == (2, 6)  # min_epochs .. train.epochs
    raw["tune"].update(sampler="random")
    assert isinstance(sampler(parse_params(raw), 0), optuna.samplers.RandomSampler)
    raw["tune"].update(sampler="tpe", parallel=2)
    tpe = sampler(parse_params(raw), 3)
    assert isinstance(tpe, optuna.samplers.TPESampler) and tpe._constant_liar


def test_a_trial_killed_between_two_draws_is_retried_with_what_it_drew(tmp_path: Path):
    """A RUNNING trial whose process on this host is gone is failed and queued again with
    the parameters it had drawn; the retry draws the others anew (`vflow tune`'s resume)."""
    import optuna
    from optuna.trial import TrialState

    storage = studies.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    killed = study.ask()
    killed.suggest_float("lr", 1e-3, 1.0, log=True)  # the kill lands before "wd"
    dead = _exited_pid()
    killed.set_user_attr(studies.WORKER_ATTR, f"{socket.gethostname()}:{dead}:None")
    failed = studies.reclaim_stale(study)
    assert [t.number for t in failed] == [killed.number]
    assert study.trials[killed.number].state == TrialState.FAIL
    retry = study.ask()
    lr = retry.suggest_float("lr", 1e-3, 1.0, log=True)
    retry.suggest_float("wd", 1e-5, 1e-2, log=True)
    assert retry.number > killed.number and lr == study.trials[killed.number].params["lr"]


def _exited_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_storage_another_process_is_creating_opens_on_the_next_try(tmp_path: Path,
                                                                     monkeypatch):
    """Two processes opening a new sqlite study file at once: the one whose CREATE TABLE
    loses ("table ... already exists") opens again and finds the tables made."""
    import sqlalchemy

    real, calls = studies.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE trial_intermediate_values (...)", {},
                Exception("table trial_intermediate_values already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(studies, "RDBStorage", racing)
    storage = studies.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert len(calls) == 2 and storage.get_all_studies() == []

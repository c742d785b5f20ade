"""Compression methods register themselves: a method registered by name runs in the sweep
by that name, an unknown name is one line naming the registered ones, and the names
`compress.methods` accepts are exactly the registered ones."""

from __future__ import annotations

import pytest

from visionflow.compression import sweep as sweep_mod
from visionflow.core.config import COMPRESS_METHODS
from visionflow.core.configfile import parse_params
from visionflow.core.errors import ConfigError


def test_a_registered_method_runs_by_name(monkeypatch):
    sweep_mod.registered_methods()  # the real ones register into the real registry first
    monkeypatch.setattr(sweep_mod, "_METHODS", dict(sweep_mod._METHODS))
    ran: list[str] = []

    @sweep_mod.register_method("test-noop", order=50)
    def _noop(sweep, ctx, original):
        ran.append(ctx)
        sweep.skip("test-noop", "ran")

    names = ["pt2e", "test-noop", "prune"]
    assert [n for n, _ in sweep_mod.method_steps(names)] == ["prune", "test-noop", "pt2e"]
    sweep = sweep_mod.Sweep()
    for name, step in sweep_mod.method_steps(["test-noop"]):
        step(sweep, f"ctx-{name}", None)
    assert ran == ["ctx-test-noop"] and sweep.skipped == [{"name": "test-noop", "reason": "ran"}]
    with pytest.raises(ValueError, match="already registered"):
        sweep_mod.register_method("test-noop", order=1)(_noop)


def test_an_unknown_method_is_one_line_naming_the_registered():
    with pytest.raises(ConfigError) as err:
        sweep_mod.method_steps(["int8", "nope"])
    msg = str(err.value)
    assert "\n" not in msg and "'nope'" in msg
    assert msg.endswith("choose from int8, prune, structured, lowrank, distill, pt2e")
    with pytest.raises(ConfigError, match=r"compress.methods=.*'nope'.*choose from int8, "):
        parse_params({"compress": {"methods": ["int8", "nope"]}})


def test_the_config_accepts_exactly_the_registered_methods():
    assert list(COMPRESS_METHODS) == sweep_mod.registered_methods()

"""Data source schemes register themselves: a scheme registered by name is read through
`source_path` by that name, an unknown one is one line naming the registered schemes, and
the schemes params.yaml accepts are exactly the registered ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionflow.core.config import SOURCE_SCHEMES, Params
from visionflow.core.configfile import parse_params
from visionflow.core.errors import ConfigError, DataError
from visionflow.core.layout import Layout
from visionflow.data import schemes
from visionflow.data.source import source_path


def test_a_registered_scheme_is_read_by_name(monkeypatch, tmp_path: Path):
    schemes.registered_schemes()  # the real ones register into the real registry first
    monkeypatch.setattr(schemes, "_READERS", dict(schemes._READERS))
    layout = Layout.at(tmp_path)

    @schemes.register_scheme("testscheme")
    class Reader:
        def folder(self, source: str, layout: Layout) -> Path:
            return layout.root / "from-scheme" / source.split(":", 1)[1]

        def materialize(self, source: str, layout: Layout) -> Path:
            (dest := self.folder(source, layout)).mkdir(parents=True)
            return dest

    params = Params().model_copy(update={"data": Params().data.model_copy(
        update={"source": "testscheme:digits"})})
    assert source_path(params, layout) == tmp_path / "from-scheme" / "digits"
    assert source_path(params, layout, fetch=True).is_dir()
    with pytest.raises(ValueError, match="already registered"):
        schemes.register_scheme("testscheme")(Reader)


def test_an_unknown_scheme_is_one_line_naming_the_registered(tmp_path: Path):
    with pytest.raises(DataError) as err:
        schemes.reader("nope:CIFAR10")
    assert "\n" not in str(err.value)
    assert "unknown source scheme 'nope', choose from torchvision" in str(err.value)
    assert schemes.reader("data") is None and schemes.reader("C:/data") is None
    with pytest.raises(ConfigError, match=r"data.source='nope:x'.*scheme 'nope'.*torchvision"):
        parse_params({"data": {"source": "nope:x"}})


def test_the_config_accepts_exactly_the_registered_schemes():
    assert sorted(SOURCE_SCHEMES) == schemes.registered_schemes()

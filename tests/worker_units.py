"""How `make test`'s pytest workers (pytest-xdist, `-n 2`) share the tests out.

A worker takes a whole unit at a time: a test file, so that its module fixtures are built
once, or all the team-stack tests (`tests/pipeline/test_stack*.py`), so that one worker boots
the one stack they share. Units are handed out in collection order, which `tests/conftest.py`
sorts longest first (`LONGEST_FIRST`), so that no worker is left with a long one at the end.
(xdist's own `--dist loadgroup` cannot do this here: it renames test ids through an attribute
pytest 9 no longer reads.) The scheduler is registered by `tests/conftest.py` only where
xdist is installed (not on the GPU machine).
"""

from __future__ import annotations

from pathlib import PurePosixPath

STACK_FILES = "test_stack*.py"  # where every `stack` test lives (checked at collection)


def unit(nodeid: str) -> str:
    """The unit of a test id: "stack" or its file."""
    path = nodeid.split("::", 1)[0]
    return "stack" if PurePosixPath(path).match(STACK_FILES) else path


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        """xdist's scope scheduling with our units as the scopes, in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    if config.getvalue("dist") in ("load", "loadfile", "loadscope", "loadgroup"):
        config.option.loadscopereorder = False  # not by test count: the order we sorted
        return ByUnit(config, log)
    return None

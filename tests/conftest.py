"""Fixtures shared by both lanes. Helpers to launch processes live in ``launching.py``."""

from __future__ import annotations

import sys

import pytest

from launching import REPO, RUN, launch
from loops import Loop


@pytest.fixture(scope="session")
def recipe_module():
    sys.path.insert(0, str(REPO))
    import recipes.moe18b as recipe

    return recipe


@pytest.fixture(scope="session")
def straight_2proc(tmp_path_factory):
    """A 2-process reference run of RUN, shared by the resume and world-size tests."""
    out = tmp_path_factory.mktemp("straight2")
    launch([*RUN, "--output_dir", str(out), "--log_data_blocks"], num_processes=2)
    return out


@pytest.fixture
def loop(tmp_path):
    """Make :class:`loops.Loop` s in ``tmp_path``; their Checkpointers are closed afterwards."""
    made = []

    def make(**kwargs):
        made.append(Loop(tmp_path, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.ckpt.close()

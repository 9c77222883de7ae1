"""Fixtures shared by both lanes. Helpers to launch processes live in ``launching.py``."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from launching import REPO, RUN, launch
from loops import Loop

# One thread per process, here and in every process the tests launch (they inherit the variable): the
# suite runs on two workers (pytest-xdist), and 2-rank launches already use both cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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

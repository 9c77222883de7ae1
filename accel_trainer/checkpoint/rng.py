"""Every rank's RNG: written once, by Accelerate's ``save_state`` (``random_states_<rank>.pkl``), and
restored loudly by us.

Accelerate's ``load_state`` restores the same file but swallows any failure ("Could not load random
states"), which would silently make a resumed run non-reproducible. We read the file again (numpy
arrays allowed, nothing else), set every generator, and raise or warn with the reason.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .io import CheckpointError, safe_torch_load


def restore(path: Path) -> list[str]:
    """Set python/numpy/torch (and CUDA) generators from one rank's RNG file.

    Returns:
        Notes about generators that could not be restored (e.g. fewer saved CUDA devices).

    Raises:
        CheckpointError: the file is unreadable, unsafe, or lacks a generator's state.
    """
    states = safe_torch_load(path, numpy=True)
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot restore the random generators from it "
                              f"({type(err).__name__}: {err})") from None
    notes = []
    if torch.cuda.is_available():
        saved = states.get("torch_cuda_manual_seed", [])
        if len(saved) >= torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved[: torch.cuda.device_count()])
        else:
            notes.append(f"CUDA RNG: {path.name} has {len(saved)} device state(s), this machine "
                         f"{torch.cuda.device_count()}; CUDA generators keep their seeded state")
    return notes


def seed_new_rank(rank: int, step: int) -> int:
    """Seed the generators of a rank that did not exist when the checkpoint was written (a larger
    world size): a fixed function of the run's initial seed, the rank and the step, so the run stays
    reproducible. Returns the seed."""
    seed = (torch.initial_seed() + 1000 * rank + step) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed

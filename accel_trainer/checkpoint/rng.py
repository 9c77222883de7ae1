"""Per-rank RNG state as plain tensors and numbers, so it loads with ``weights_only=True``.

Accelerate's own ``random_states_<rank>.pkl`` holds numpy objects and its loader swallows failures
("Could not load random states"); ours is authoritative, and a rank without a saved state is told so.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python_version": py_version, "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_name": np_name, "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> list[str]:
    """Set every generator from ``state``; returns notes about generators that could not be restored."""
    notes = []
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        saved = state.get("torch_cuda", [])
        if len(saved) >= torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved[: torch.cuda.device_count()])
        else:
            notes.append(f"CUDA RNG: checkpoint has {len(saved)} device state(s), this machine "
                         f"{torch.cuda.device_count()}; CUDA generators keep their seeded state")
    return notes

"""Level 1: the Checkpointer component in a plain Accelerate loop, in-process (real Accelerate, real
files, a tiny transformers model): names, exact resume, best/latest/retention, and the save
protocol under failures injected at every file (a full disk, a failed rename, a failed background
write) and on a rank that is not the main process."""

from __future__ import annotations

import ast
import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from accel_trainer.checkpoint import CheckpointError, Checkpointer, load_model_for_inference, verify
from accel_trainer.checkpoint import manager as manager_module
from accel_trainer.checkpoint.layout import list_checkpoints, read_pointer
from accel_trainer.faults import failing_disk

from launching import REPO
from loops import Counter


def steps_on_disk(tmp_path) -> list[int]:
    return [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]


def test_resume_in_a_fresh_loop_continues_bit_exactly(loop, tmp_path):
    a = loop()
    a.train(13)  # past the end of the first epoch (10 batches)
    assert a.ckpt.save(13) == tmp_path / "checkpoints" / "step-13"
    expected = a.train(12)
    b = loop()
    assert b.ckpt.resume("latest") == 13
    assert b.train(12) == expected
    assert b.counter.tokens == a.counter.tokens
    assert b.schedulers["optimizer"].get_last_lr() == a.schedulers["optimizer"].get_last_lr()
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


def test_everything_is_saved_by_name(loop, tmp_path):
    a = loop()
    a.train(2)
    folder = a.ckpt.save(2)
    files = set(json.loads((folder / "manifest.json").read_text())["files"])
    assert files == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "schedulers.json",
                     "dataloader.json", "loop.json", "run_config.json", "config.json", "random_states_0.pkl"}
    opt = json.loads((folder / "optimizer.json").read_text())["optimizers"]["optimizer"]
    assert opt["param_groups"][0]["param_names"][0] == "model.embed_tokens.weight"  # a plain AdamW, named
    from safetensors import safe_open

    with safe_open(folder / "optimizer.safetensors", "pt") as f:
        assert "lm_head.weight::exp_avg_sq" in f.keys()
        assert list(f.keys()) == sorted(f.keys())  # bytes are a function of the state, not its history
    assert set(json.loads((folder / "schedulers.json").read_text())) == {"scheduler"}
    assert json.loads((folder / "loop.json").read_text()) == {"tokens": 2 * 4 * 8}
    assert json.loads((folder / "dataloader.json").read_text())["samples_in_epoch"] == 8
    model, config, step = load_model_for_inference(tmp_path, device="cpu")
    assert step == 2 and config.model_type == "llama" and model.load_report.exact


def test_several_optimizers_by_name_and_a_mismatch_names_them(loop, tmp_path):
    a = loop(optimizers=("embeddings", "rest"))
    a.train(3)
    a.ckpt.save(3)
    expected = a.train(2)
    b = loop(optimizers=("embeddings", "rest"))
    assert b.ckpt.resume("latest") == 3 and b.train(2) == expected
    c = loop(optimizers=("embeddings", "other"))
    with pytest.raises(CheckpointError, match=r"optimizers \['embeddings', 'rest'\] but this run has "
                                              r"\['embeddings', 'other'\] \(missing \['other'\], unexpected "
                                              r"\['rest'\]\)"):
        c.ckpt.resume("latest")


def test_latest_with_nothing_saved_starts_fresh_and_a_missing_name_lists_what_exists(loop, capsys):
    a = loop()
    assert a.ckpt.resume("latest") == 0
    assert "no checkpoint under" in capsys.readouterr().out
    a.ckpt.save(1)
    with pytest.raises(CheckpointError, match=r"'step-7': no such checkpoint; available under .*: step-1"):
        a.ckpt.resume("step-7")


def test_best_follows_the_metric_and_retention_keeps_latest_and_best(loop, tmp_path):
    a = loop(save_total_limit=2)
    for step, val in zip(range(1, 7), [3.0, 1.0, 2.0, 4.0, None, 5.0]):
        assert a.ckpt.improves_best({"val_loss": val}) == (step in (1, 2))
        a.ckpt.save(step, metrics={} if val is None else {"val_loss": val})
    root = tmp_path / "checkpoints"
    assert read_pointer(root, "best").name == "step-2" and read_pointer(root, "latest").name == "step-6"
    assert steps_on_disk(tmp_path) == [2, 5, 6]
    assert a.ckpt.best == {"metric": "val_loss", "value": 1.0, "step": 2}
    b = loop()
    b.ckpt.resume("latest")
    assert b.ckpt.best == a.ckpt.best and not b.ckpt.improves_best({"val_loss": 1.5})


def test_exclude_optimizer_keeps_this_runs_fresh_optimizer(loop):
    a = loop()
    a.train(3)
    a.ckpt.save(3)
    b = loop()
    b.ckpt.resume("latest", exclude=("optimizer",))
    assert not b.optimizers["optimizer"].state and b.counter.tokens == a.counter.tokens
    with pytest.raises(ValueError, match=r"\['optimiser'\] name no part"):
        b.ckpt.resume("latest", exclude=("optimiser",))


def test_state_that_is_not_plain_json_goes_to_a_weights_only_file(loop, tmp_path):
    class Ema:
        def __init__(self):
            self.value = torch.zeros(3)

        def state_dict(self):
            return {"value": self.value, "decay": (0.9, 0.99)}  # a tensor and a tuple: not plain JSON

        def load_state_dict(self, state):
            self.value = state["value"]

    a = loop()
    a.ckpt.extra["ema"] = ema = Ema()
    ema.value = torch.arange(3.0)
    folder = a.ckpt.save(1)
    assert (folder / "ema.pt").is_file() and not (folder / "ema.json").exists()
    b = loop()
    b.ckpt.extra["ema"] = Ema()
    b.ckpt.resume("latest")
    assert torch.equal(b.ckpt.extra["ema"].value, torch.arange(3.0))


def test_bad_extra_names_and_objects_are_refused_at_construction(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"'optimizer' cannot name a state file"):
        Checkpointer(acc, tmp_path, model=model, extra={"optimizer": Counter()})
    with pytest.raises(TypeError, match=r"'x' is a int, which has no state_dict"):
        Checkpointer(acc, tmp_path, model=model, extra={"x": 3})


# --------------------------------------------------------------------------- the save protocol
WRITTEN = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "schedulers.json", "dataloader.json",
           "loop.json", "run_config.json", "config.json", "random_states_0.pkl", "manifest.json", "COMPLETE"]


def assert_intact(tmp_path, latest: int) -> None:
    root = tmp_path / "checkpoints"
    assert read_pointer(root, "latest").name == f"step-{latest}"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert all(verify(folder) == [] for _, folder in list_checkpoints(root))


@pytest.mark.parametrize("name", WRITTEN)
@pytest.mark.parametrize("after_bytes", [0, 5])
def test_a_full_disk_at_any_file_skips_the_save_and_keeps_the_checkpoints(loop, tmp_path, name, after_bytes):
    a = loop()
    a.train(1)
    a.ckpt.save(1)
    a.train(1)
    with failing_disk(name, after_bytes=after_bytes), pytest.warns(UserWarning, match="checkpoint at step 2 not saved"):
        assert a.ckpt.save(2) is None
    assert_intact(tmp_path, latest=1)
    assert steps_on_disk(tmp_path) == [1]
    assert a.ckpt.save(3) is not None  # the next save works
    assert_intact(tmp_path, latest=3)


def test_save_strict_raises_and_keeps_the_checkpoints(loop, tmp_path):
    a = loop(save_strict=True)
    a.ckpt.save(1)
    with failing_disk("random_states_0.pkl"), pytest.raises(CheckpointError, match=r"not saved: RuntimeError: .*No "
                                                                                   r"space left on "
                                                                                   r"device.*--save_strict"):
        a.ckpt.save(2)
    assert_intact(tmp_path, latest=1)


def test_a_failed_commit_rename_leaves_no_trace_and_a_same_step_resave_keeps_the_old_one(loop, tmp_path):
    a = loop()
    a.ckpt.save(1)
    with failing_disk(rename_of=(".tmp-step-2",)), pytest.warns(UserWarning, match="Input/output error"):
        assert a.ckpt.save(2) is None
    assert_intact(tmp_path, latest=1)
    before = (tmp_path / "checkpoints" / "step-1" / "manifest.json").read_bytes()
    with failing_disk(rename_of=(".tmp-step-1",)), pytest.warns(UserWarning, match="not saved"):
        assert a.ckpt.save(1, reason="emergency") is None  # the swap failed: the old step-1 is put back
    assert (tmp_path / "checkpoints" / "step-1" / "manifest.json").read_bytes() == before
    assert_intact(tmp_path, latest=1)


def test_a_failed_background_write_is_reported_and_never_becomes_latest(loop, tmp_path):
    a = loop(async_save=True)
    a.ckpt.save(1, metrics={"val_loss": 2.0})
    a.ckpt.wait()
    with failing_disk("model.safetensors"):
        assert a.ckpt.save(2, metrics={"val_loss": 1.0}) is not None  # staged; the write fails behind
        with pytest.warns(UserWarning, match="background checkpoint write failed"):
            a.ckpt.wait()
    assert_intact(tmp_path, latest=1)
    assert a.ckpt.best["step"] == 1 and a.ckpt.last_saved_step is None  # an emergency save must redo step 2
    a.ckpt.save(3)
    a.ckpt.wait()
    assert_intact(tmp_path, latest=3)


def test_async_save_equals_a_sync_save(loop, tmp_path):
    a = loop(async_save=True)
    a.train(2)
    folder = a.ckpt.save(2)
    a.ckpt.wait()
    sync = loop()
    sync.train(2)
    other = sync.ckpt.save(2, wait=True)
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "dataloader.json"):
        assert (folder / name).read_bytes() == (other / name).read_bytes(), name


def test_a_rank_other_than_the_main_one_writes_only_its_rng(tmp_path, monkeypatch):
    """Rank 1 of 2: agreements are faked (they need a process group); what rank 1 writes is real."""
    model = torch.nn.Linear(2, 2)
    fake = SimpleNamespace(
        num_processes=2, process_index=1, is_main_process=False, distributed_type="MULTI_CPU",
        device=torch.device("cpu"), _optimizers=[], _schedulers=[], _dataloaders=[], print=lambda *a: None,
        unwrap_model=lambda m: m, register_save_state_pre_hook=lambda h: SimpleNamespace(remove=lambda: None),
        register_load_state_pre_hook=lambda h: SimpleNamespace(remove=lambda: None))

    monkeypatch.setattr(manager_module, "gather_object", lambda problems: problems + [None])
    monkeypatch.setattr(manager_module, "broadcast_object_list", lambda answer, from_process: answer.__setitem__(0, 1))
    ckpt = Checkpointer(fake, tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lock=False)
    (tmp_path / "checkpoints" / ".tmp-step-5").mkdir(parents=True)  # made by rank 0 in the reserve phase
    ckpt.save(5)
    # Accelerate's public save_accelerator_state wrote this rank's RNG, and nothing else was written.
    assert [p.name for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()] == ["random_states_1.pkl"]


def test_accelerate_private_lists_that_we_filter_still_exist(loop, tmp_path):
    """Engine-owned models (FSDP1, DeepSpeed) still go through Accelerator.save_state, which has no
    public switch to leave prepared objects out; EngineOwned filters its private lists for the call.
    If an upgrade renames them, this fails instead of writing our optimizer twice as optimizer.bin."""
    from accel_trainer.checkpoint.strategies import EngineOwned

    a = loop()
    acc = a.accelerator
    for name in ("_optimizers", "_schedulers", "_dataloaders"):
        assert isinstance(getattr(acc, name), list) and getattr(acc, name), name
    engine = EngineOwned(a.ckpt.strategy.parts)
    with engine._accelerate_skips_what_we_save(hide_optimizers=True):
        assert acc._optimizers == [] and acc._schedulers == [] and acc._dataloaders == []
    assert len(acc._optimizers) == len(acc._schedulers) == len(acc._dataloaders) == 1  # restored after the call
    engine.save_engine_state(tmp_path, 1)  # the engine's model and optimizer; never our scheduler by position
    assert "optimizer.bin" in {p.name for p in tmp_path.iterdir()}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("scheduler", "sampler"))]


def test_a_whole_model_is_saved_through_public_accelerate_routes_only(loop):
    """TensorFiles: Accelerate's share (RNG, scaler) through save_accelerator_state; nothing positional."""
    a = loop()
    a.accelerator.save_state = a.accelerator.load_state = None  # would fail if called
    folder = a.ckpt.save(1)
    assert not [p.name for p in folder.iterdir() if p.suffix == ".bin"]
    assert (folder / "random_states_0.pkl").is_file() and (folder / "model.safetensors").is_file()
    assert a.ckpt.resume(str(folder)) == 1


def test_the_checkpoint_package_imports_nothing_of_the_trainer_model_or_data():
    banned = ("accel_trainer.models", "accel_trainer.trainer", "accel_trainer.data", "accel_trainer.run",
              "accel_trainer.optim")
    for path in sorted((REPO / "accel_trainer" / "checkpoint").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                absolute = ("accel_trainer." + module if node.level == 2 else
                            "accel_trainer.checkpoint." + module if node.level == 1 else module)
                names = [absolute + "." + a.name if node.level == 2 and not module else absolute for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(banned), f"{path.name} imports {name}"


def test_close_gives_the_signal_handlers_back_unless_a_stop_came(loop, tmp_path):
    """After a stop signal the process is on its way out: a repeated signal (a worker whose launcher
    was killed gets SIGTERM again while it shuts down) must not end it before it reports how it
    ended, so the handlers stay; without a stop, close() restores what was there."""
    import os
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    calm = loop(handle_signals=True)
    calm.ckpt.close()
    assert signal.getsignal(signal.SIGUSR1) is before
    stopped = loop(handle_signals=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stopped.ckpt.stop_requested()
    stopped.ckpt.close()
    os.kill(os.getpid(), signal.SIGUSR1)  # with the default action this would end the test process
    assert stopped.ckpt.stop_signal == signal.SIGUSR1
    signal.signal(signal.SIGUSR1, before)

"""A resume reads each tensor file once, hashing it as it reads (issue #28, item 5), and still never
trains on a damaged one: the damage is found in the same pass and the resume starts over from the
checkpoint ``latest`` falls back to, loaded whole; a checkpoint named explicitly is refused."""

from __future__ import annotations

import pytest
import torch

from accel_trainer.checkpoint import CheckpointConfig, CheckpointError, read_tensor_file
from accel_trainer.checkpoint import manifest as manifest_module
from accel_trainer.checkpoint.manifest import saved_digests
from accel_trainer.checkpoint.stored_tensors import read_verified
from accel_trainer.errors import DamagedFile
from loops import Loop

TENSOR_FILES = {"none": ("model.safetensors", "optimizer.safetensors"),
                "zstd": ("model.ztensors", "optimizer.ztensors")}


def state_of(loop):
    weights = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
    moments = {(i, k): v.clone() for i, s in enumerate(loop.optimizers["optimizer"].state.values())
               for k, v in s.items() if torch.is_tensor(v)}
    return weights, moments, loop.counter.tokens


@pytest.fixture(params=["none", "zstd"])
def run(tmp_path, request):
    """Checkpoints at steps 2 and 4 of a real loop, plain or compressed, and the state at step 2."""
    loop = Loop(tmp_path, settings=CheckpointConfig(compression=None if request.param == "none" else "zstd"))
    loop.train(2)
    loop.counter.tokens = 2
    first = loop.ckpt.save(2)
    at_two = state_of(loop)
    loop.train(2)
    loop.counter.tokens = 4
    second = loop.ckpt.save(4)
    loop.ckpt.close()
    return tmp_path, first, second, at_two, TENSOR_FILES[request.param]


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_one_pass_reads_what_the_plain_reader_reads_and_finds_damage_in_the_same_pass(run):
    _, _, second, _, names = run
    digests = saved_digests(second)
    for name in names:
        path = second / name
        expected = read_tensor_file(path)
        got = dict(read_verified(path, digests[name]))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        size = path.stat().st_size
        flip(path, size - 3)  # tensor data, the file's last bytes
        with pytest.raises(DamagedFile, match=f"{name}: (checksum mismatch|tensor .* does not decompress)"):
            for _ in read_verified(path, digests[name]):
                pass
        flip(path, size - 3)
        with open(path, "r+b") as f:
            f.truncate(size - 1)
        with pytest.raises(DamagedFile, match=name):
            list(read_verified(path, digests[name]))


def test_the_resolution_leaves_the_tensor_files_to_the_resume_which_hashes_them_once(run, monkeypatch):
    out, _, second, _, names = run
    hashed = []
    real = manifest_module.hash_file
    monkeypatch.setattr(manifest_module, "hash_file", lambda p: hashed.append(p.name) or real(p))
    loop = Loop(out)
    assert loop.ckpt.resume("latest") == 4
    assert not set(names) & set(hashed), hashed  # sizes only: the loader compared their checksums
    assert "optimizer.json" in hashed and "dataloader.json" in hashed


@pytest.mark.parametrize("which", [0, 1], ids=["model", "optimizer"])
@pytest.mark.parametrize("where", ["data", "header"])
def test_latest_damaged_while_read_falls_back_and_loads_the_older_checkpoint_whole(run, which, where, capsys):
    out, first, second, (weights, moments, tokens), names = run
    path = second / names[which]
    flip(path, path.stat().st_size - 3 if where == "data" else 12)
    loop = Loop(out)
    with pytest.warns(UserWarning, match=rf"'latest' falls back to step-2: skipped step-4: .*{names[which]}"):
        assert loop.ckpt.resume("latest") == 2
    said = capsys.readouterr().out
    assert f"step-4/{names[which]}" in said and "found while resuming" in said  # in the one pass, not before
    now = state_of(loop)
    assert all(torch.equal(now[0][k], weights[k]) for k in weights)  # no weight of the damaged file is left
    assert now[1].keys() == moments.keys() and all(torch.equal(now[1][k], moments[k]) for k in moments)
    assert now[2] == tokens == 2


def test_a_damaged_checkpoint_named_explicitly_is_refused_in_one_line(run):
    out, _, second, _, names = run
    flip(second / names[0], (second / names[0]).stat().st_size - 3)
    loop = Loop(out)
    with pytest.raises(CheckpointError, match=rf"step-4/{names[0]}: checksum mismatch") as err:
        loop.ckpt.resume("step-4")
    assert "\n" not in str(err.value)

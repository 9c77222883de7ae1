"""The fast checkpoint files: streamed safetensors with checksums, optimizer state by name."""

import pytest
import torch
from safetensors.torch import load_file

from accel_trainer.checkpoint import optimizer_files
from accel_trainer.checkpoint.format import OPTIMIZER_TENSORS
from accel_trainer.checkpoint.checksums import hash_file
from accel_trainer.checkpoint.tensor_files import SafetensorsFile
from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.optim import OptimizerSettings, build_optimizers


def write_safetensors(path, tensors, metadata=None) -> str:
    """As the strategies write a file: stream it, then hash the same bytes from memory."""
    file = SafetensorsFile(tensors, metadata)
    file.write(path)
    return file.digest()


def test_streamed_file_is_standard_safetensors_and_digest_matches(tmp_path):
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7.0), "ids": torch.arange(5),
               "h": torch.randn(2, 2).bfloat16(), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    digest = write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"k": "v"})
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert digest == hash_file(tmp_path / "t.safetensors")


def test_unsupported_dtype_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match="tensor 'z' has dtype torch.complex64"):
        write_safetensors(tmp_path / "t.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


def test_our_optimizer_container_round_trips_by_name(tmp_path):
    """Muon (3D experts) + AdamW, named by the optimizers' own param_names: same state back."""
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                                     num_experts_per_tok=2))
    opt = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    tensors, description = optimizer_files.split_state(opt.optimizers, names_by_id={})
    assert "model.layers.0.mlp.gate_proj::momentum_buffer" in tensors
    assert "lm_head.weight::exp_avg_sq" in tensors
    write_safetensors(tmp_path / OPTIMIZER_TENSORS, tensors)
    optimizer_files.write_description(tmp_path, description)
    fresh = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    optimizer_files.load_into(tmp_path, fresh.optimizers, names_by_id={})
    for name in ("muon", "adamw"):
        before, after = opt.optimizers[name].state_dict(), fresh.optimizers[name].state_dict()
        assert after["param_groups"] == before["param_groups"]
        for pid, state in before["state"].items():
            for key, value in state.items():
                assert torch.equal(after["state"][pid][key], value), (name, pid, key)


# ------------------------------------------------------------------------------ compressed (ztensors)
def test_compressed_files_round_trip_bitwise_for_every_dtype_and_size(tmp_path, monkeypatch):
    """Lossless: every dtype, a tensor split over several chunks (and one that is not a whole number of
    them), scalars, empty tensors, NaN/inf payloads; the digest is over the stored bytes."""
    from accel_trainer.checkpoint import ztensors

    monkeypatch.setattr(ztensors, "CHUNK_BYTES", 1000)  # several chunks per tensor, decompressed in parallel
    g = torch.Generator().manual_seed(0)
    weird = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])
    tensors = {"w": torch.randn(37, 41, generator=g), "h": torch.randn(300, generator=g).bfloat16(),
               "f16": torch.randn(7, generator=g).half(), "d": torch.randn(5, generator=g, dtype=torch.float64),
               "ids": torch.arange(1001), "i32": torch.arange(9, dtype=torch.int32),
               "i8": torch.arange(-4, 4).to(torch.int8),
               "u8": torch.arange(256, dtype=torch.uint8), "mask": torch.tensor([True, False, True]),
               "step": torch.tensor(7.0), "empty": torch.zeros(0, 3), "weird": weird}
    file = ztensors.ZstdTensorFile(tensors, metadata={"k": "v"}, level=3, threads=3)
    path = tmp_path / "t.ztensors"
    file.write(path)
    assert file.digest() == hash_file(path) and path.stat().st_size == file.stored_bytes
    back = ztensors.load_file(path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert back[name].reshape(-1).view(torch.uint8).equal(tensor.reshape(-1).view(torch.uint8)), name
    assert len(ztensors.read_header(path)["tensors"]["w"]["chunks"]) > 1
    with ztensors.ZstdTensorReader(path) as reader:  # one at a time, as resume and diff read
        assert reader.shape("w") == (37, 41) and torch.equal(reader.get_tensor("w"), tensors["w"])
    with ztensors.ZstdTensorReader(path, threads=2) as reader:  # decompressing ahead, yielded in order
        streamed = list(reader.iter_tensors(["w", "ids", "empty", "h"], ahead=2))
    assert [n for n, _ in streamed] == ["w", "ids", "empty", "h"]
    assert all(t.reshape(-1).view(torch.uint8).equal(tensors[n].reshape(-1).view(torch.uint8)) for n, t in streamed)
    sizes = ztensors.shapes_and_sizes(path)
    assert sizes["w"] == {"dtype": "F32", "shape": [37, 41], "nbytes": 37 * 41 * 4}


def test_grouped_bytes_make_trained_like_weights_smaller_than_plain_zstd(tmp_path):
    """Why the bytes are grouped: fp32 values of one scale share exponent bytes, which zstd finds only
    when they sit together (plain zstd of the interleaved bytes gains almost nothing)."""
    import zstandard

    from accel_trainer.checkpoint import ztensors

    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    grouped = ztensors.ZstdTensorFile({"w": w}).stored_bytes
    plain = len(zstandard.ZstdCompressor(level=3).compress(w.numpy().tobytes()))
    assert grouped < 0.95 * plain < w.numel() * 4


def test_a_damaged_compressed_file_is_an_error_naming_it_never_wrong_numbers(tmp_path):
    from accel_trainer.checkpoint import CheckpointError, ztensors

    path = tmp_path / "t.ztensors"
    ztensors.ZstdTensorFile({"w": torch.randn(64, 64)}).write(path)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # inside the frame: zstd's content checksum (written with every frame) finds it
    (tmp_path / "flip.ztensors").write_bytes(bytes(data))
    (tmp_path / "cut.ztensors").write_bytes(bytes(data[:-100]))
    (tmp_path / "junk.ztensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    for name, message in (("cut", "truncated"), ("junk", "not a readable")):
        with pytest.raises(CheckpointError, match=message):
            ztensors.load_file(tmp_path / f"{name}.ztensors")
    with pytest.raises(CheckpointError, match="does not decompress"):
        ztensors.load_file(tmp_path / "flip.ztensors")

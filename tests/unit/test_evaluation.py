"""Evaluation as the field does it, in-process: bits per byte against a hand computation, the bytes
each token stands for, 'best' following val_bpb, and the eval verb's one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from accel_trainer.data import byte_tokenizer, token_byte_lengths, train_tokenizer


def test_token_bytes_sum_to_the_texts_utf8_bytes():
    text = "naïve café: π ≈ 3.14159 — def f(x):\n    return x ** 2  # ok ✓"
    for tokenizer in (byte_tokenizer(), train_tokenizer([text * 20], 300, show_progress=False)):
        lengths = token_byte_lengths(tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
        assert all(lengths[i] == 0 for i in tokenizer.all_special_ids)


def test_val_bpb_is_the_summed_loss_over_ln2_and_the_texts_bytes(tmp_path, recipe_module):
    """A file of ASCII text and the byte tokenizer: every non-special token is one byte, so the hand
    computation is the mean cross-entropy of the text tokens divided by ln 2."""
    from accel_trainer import load_model_for_inference
    from accel_trainer.config import DataArguments
    from accel_trainer.data import build_datasets

    text = tmp_path / "a.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog "
                            f"{i * 7 % 13}\n" for i in range(400)))
    out = tmp_path / "run"
    assert recipe_module.main(["--preset", "tiny", "--data_files", str(text), "--block_size", "64", "--max_steps", "2",
                               "--eval_steps", "2", "--max_eval_batches", "2", "--per_device_eval_batch_size", "3",
                               "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm",
                               "--output_dir", str(out)]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    model, _, step = load_model_for_inference(out, device="cpu")
    data = build_datasets(DataArguments(data_files=[str(text)], block_size=64), 42, out, 64, progress=False)
    blocks = torch.stack([data.validation[i]["input_ids"] for i in range(6)])  # 2 batches of 3
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           blocks[:, 1:].reshape(-1), reduction="none")
    text_tokens = blocks[:, 1:].reshape(-1) < 256  # BOS/EOS/PAD are 256..258: no bytes
    assert step == 2
    assert logged["val_loss"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert logged["val_bpb"] == pytest.approx(ce[text_tokens].sum().item() / (math.log(2) * text_tokens.sum().item()),
                                             rel=1e-5)


def test_best_can_follow_val_bpb(tmp_path, recipe_module):
    out = tmp_path / "run"
    assert recipe_module.main(["--preset", "tiny", "--max_corpus_bytes", "60000", "--block_size", "32", "--max_steps",
                               "4",
                               "--eval_steps", "2", "--max_eval_batches", "1", "--per_device_train_batch_size", "2",
                               "--report_to", "none", "--disable_tqdm", "--metric_for_best_model", "val_bpb",
                               "--output_dir", str(out)]) == 0
    best = (out / "checkpoints" / "best").read_text().strip()
    manifest = json.loads((out / "checkpoints" / best / "manifest.json").read_text())
    assert manifest["best"]["metric"] == "val_bpb"
    logged = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert manifest["best"]["value"] == min(r["val_bpb"] for r in logged.values() if "val_bpb" in r)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "hellaswagg"], "--tasks: 'hellaswagg' is not a task of lm-evaluation-harness; did you mean hellaswag"),
    (["--tasks", "x", "--include_path", "/no/such/dir"], "--include_path='/no/such/dir': no such folder"),
    (["--tasks", "hellaswag", "--limit", "0"], "--limit=0.0: must be > 0"),
])
def test_eval_bad_input_is_one_line(args, message, tmp_path, capsys):
    from accel_trainer.cli import main

    assert main(["eval", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_of_something_that_is_no_checkpoint_or_without_lm_eval_is_one_line(tmp_path, capsys, monkeypatch):
    import builtins

    from accel_trainer.cli import main

    assert main(["eval", str(tmp_path / "nope"), "--tasks", "hellaswag"]) == 2
    assert "does not exist" in capsys.readouterr().err
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", str(tmp_path), "--tasks", "hellaswag"]) == 2
    assert "pip install 'accel_trainer[eval]'" in capsys.readouterr().err

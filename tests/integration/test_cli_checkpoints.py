"""`accel-trainer` commands on real checkpoints made by a tiny run (called in-process; the console
script itself is tested in test_cli_args.py)."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from accel_trainer.cli import main
from launching import TINY, launch_here



def cli(*args, check=True):
    """Run ``accel-trainer ARGS`` in this process; the result looks like a finished subprocess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # what the interpreter would do with it
            code = exit_.code if isinstance(exit_.code, int) or exit_.code is None else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
    proc = SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    launch_here([*TINY, "--max_steps", "8", "--save_steps", "2", "--eval_steps", "4", "--output_dir", str(out)])
    return out


def test_list_shows_every_checkpoint_and_tags(run):
    out = cli("list", run).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["checkpoint", "epoch", "tokens", "val_loss", "size", "tags"]
    assert [line.split()[0] for line in lines[1:]] == ["step-2", "step-4", "step-6", "step-8"]
    assert "latest" in lines[-1]
    rows = json.loads(cli("list", run, "--json").stdout)
    assert rows[-1]["metrics"]["tokens_seen"] == 8 * 4 * 64 and "latest" in rows[-1]["tags"]
    assert any("best" in r["tags"] for r in rows)


def test_inspect_human_and_json(run):
    text = cli("inspect", run).stdout
    for needle in ("step 8", "673,408 parameters (476,800 active per token)", "optimizer    muon:",
                   "optimizer    adamw:", "1 process(es)", "model.safetensors", "optimizer.safetensors",
                   "dataloader.json", "trainer_state.json"):
        assert needle in text, needle
    info = json.loads(cli("inspect", run / "checkpoints" / "step-4", "--json").stdout)
    assert info["step"] == 4 and info["format_version"] == 2
    assert info["data_position"]["samples_in_epoch"] == 16 and info["states"]["trainer_state"]["global_step"] == 4
    assert {o["optimizer"] for o in info["optimizers"]} == {"muon", "adamw"}
    assert all(o["state_bytes"] > 0 for o in info["optimizers"])
    assert info["environment"]["world_size"] == 1


def test_verify_passes_then_names_the_bad_file(run, tmp_path):
    assert cli("verify", run).stdout.count("OK ") == 4
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    target = copy / "checkpoints" / "step-6" / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    proc = cli("verify", copy, check=False)
    assert proc.returncode == 1
    assert "BAD" in proc.stdout and "step-6/optimizer.safetensors: checksum mismatch" in proc.stdout
    assert cli("verify", copy / "checkpoints" / "step-8").returncode == 0


def test_diff_reports_weight_changes(run):
    out = cli("diff", run / "checkpoints" / "step-2", run / "checkpoints" / "step-8", "--top", "3").stdout
    assert "run config: same" in out and "architecture: same tensors and shapes" in out
    assert "largest 3 of" in out
    result = json.loads(cli("diff", run / "checkpoints" / "step-2", run / "checkpoints" / "step-8", "--json").stdout)
    assert all(c["change_norm"] > 0 for c in result["tensor_changes"])


HF_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
prompt = tokenizer("def main(", return_tensors="pt")
generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
assert "accel_trainer" not in sys.modules
print("generated", repr(tokenizer.decode(generated[0])), model.generation_config.eos_token_id)
eos = tokenizer.eos_token_id  # made the likeliest token: generation must stop right after it
stopped = model.generate(**prompt, max_new_tokens=8, do_sample=False, sequence_bias={(eos,): 1e4})
print("stopped after", stopped.shape[1] - prompt["input_ids"].shape[1], "at", int(stopped[0, -1]) == eos)
print("byte ids", tokenizer("h\u00e9llo", add_special_tokens=False)["input_ids"] == list("h\u00e9llo".encode()))
ids = torch.arange(40).reshape(2, 20) % model.config.vocab_size
print(type(model).__name__, {k: sorted(v) for k, v in info.items() if v})
torch.save(model(ids).logits.detach(), sys.argv[2])
"""


def test_export_loads_in_plain_transformers_with_the_same_outputs(run, tmp_path):
    """The default export is stock Qwen2-MoE: a fresh Python without this package loads it, same logits."""
    out = tmp_path / "hf"
    printed = cli("export", run, out).stdout
    assert "qwen2_moe" in printed and "import accel_trainer" not in printed
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-c", HF_LOAD, str(out), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "Qwen2MoeForCausalLM {}"  # nothing missing/unexpected
    assert "generated 'def main(" in proc.stdout and " 257\n" in proc.stdout  # the byte tokenizer's EOS
    assert "stopped after 1 at True" in proc.stdout and "byte ids True" in proc.stdout
    from accel_trainer import load_model_for_inference

    ours, _, _ = load_model_for_inference(run, device="cpu")
    ids = torch.arange(40).reshape(2, 20) % ours.config.vocab_size
    theirs = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(theirs, ours(ids).logits.detach(), rtol=1e-4, atol=1e-4)
    assert cli("export", run, out, check=False).returncode != 0  # never overwrites


def test_export_in_our_own_format_is_the_exact_weights(run, tmp_path):
    out = tmp_path / "native"
    cli("export", run, out, "--format", "accel_moe", "--dtype", "bf16")
    import accel_trainer.models  # noqa: F401  (registers the model type with the Auto classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    from accel_trainer import load_model_for_inference

    original, _, _ = load_model_for_inference(run, device="cpu", dtype=torch.bfloat16)
    for k, v in original.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_prune_dry_run_then_for_real(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / ".tmp-step-99").mkdir()
    dry = cli("prune", copy, "--keep", "1", "--dry_run").stdout
    assert "would delete" in dry and (copy / "checkpoints" / "step-2").exists()
    cli("prune", copy, "--keep", "1")
    left = sorted(p.name for p in (copy / "checkpoints").iterdir() if p.is_dir())
    best = (copy / "checkpoints" / "best").read_text().strip()
    assert left == sorted({"step-8", best})


def test_params_accepts_a_run_dir_and_a_checkpoint_like_the_other_verbs(run):
    for target in (run, run / "checkpoints" / "step-4", run / "checkpoints" / "step-4" / "config.json"):
        out = cli("params", target).stdout
        assert out.startswith("accel_moe: total 673,408  active 476,800"), target
        assert "muon      expert stack" in out and "adamw     router" in out  # the optimizer assignment


def test_read_only_verbs_start_without_torch_or_transformers(run):
    """What keeps `list|verify|inspect|prune` under 1.5 s (benchmarks/cli_startup.py measures it)."""
    code = ("import sys, contextlib, io\nfrom accel_trainer.cli import main\n"
            "for argv in sys.argv[1:]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(argv.split()) == 0, argv\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules))")
    verbs = [f"list {run}", f"verify {run}", f"inspect {run}", f"prune {run} --keep 1 --dry_run"]
    proc = subprocess.run([sys.executable, "-c", code, *verbs], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [("inspect", "/nonexistent"), ("list", "/nonexistent"), ("verify", "/nonexistent"),
                                  ("diff", "/nonexistent", "/nonexistent2"), ("export", "/nonexistent", "/tmp/x"),
                                  ("params", "/nonexistent"), ("prune", "/nonexistent", "--keep", "1")])
def test_bad_paths_are_one_line_and_non_zero(args):
    proc = cli(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"accel-trainer {args[0]}: ")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

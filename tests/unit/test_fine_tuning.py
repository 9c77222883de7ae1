"""Fine-tuning as the field does it (issue #30), in-process: chat data with the loss on the
assistant's tokens only (equal to plain transformers' assistant-only loss of the same conversations,
packed or not), best-fit packing, and LoRA checkpoints that hold the adapters only, whose PEFT and
merged exports give the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chat_models import make_chat_model
from launching import REPO, launch_here, read_jsonl

CAUSAL_LM = REPO / "recipes" / "causal_lm.py"
COMMON = ["--report_to", "none", "--disable_tqdm", "--logging_steps", "1", "--validation_split_percentage", "5"]
BLOCK = 256


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("chat"))


def rendered(root: Path) -> list[tuple[list[int], list[int]]]:
    """Every conversation through the tokenizer's template as plain transformers renders it:
    token ids and labels (-100 off the assistant's tokens), as TRL's assistant_only_loss makes them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "llama")
    out = []
    for line in (root / "chat.jsonl").read_text().splitlines():
        enc = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def reference_loss(root: Path, conversations) -> float:
    """transformers' own loss of the conversations in one right-padded batch (attention mask)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "llama").eval()
    longest = max(len(ids) for ids, _ in conversations)
    ids = torch.zeros(len(conversations), longest, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for i, (x, y) in enumerate(conversations):
        ids[i, :len(x)], labels[i, :len(y)], attention[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention, labels=labels).loss.item()


def test_best_fit_places_every_item_whole_into_few_rows_deterministically():
    import numpy as np

    from accel_trainer.data.chat import best_fit

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    bins = best_fit(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(500))  # each once, never split
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 100) * 1.1) + 1  # near the bound of full rows
    assert bins == best_fit(lengths, 100)


def test_labels_are_the_assistant_tokens_and_positions_restart_per_conversation(chat, tmp_path):
    from transformers import AutoTokenizer

    from accel_trainer.data.chat import ChatRows, chat_source, prepare_chat

    tokenizer = AutoTokenizer.from_pretrained(chat / "llama")
    files = [str(chat / "chat.jsonl")]
    prepare_chat(files, tokenizer, tmp_path / "p", chat_source(files, "t"), progress=False)
    rows = ChatRows(tmp_path / "p", BLOCK, 0.05, packing=True)
    assert rows.num_train < 61 and rows.truncated == 0
    r = next(i for i, row in enumerate(rows.rows) if len(row) >= 2)
    item = rows.item(r)
    starts = (item["position_ids"] == 0).nonzero().flatten().tolist()
    assert len(starts) >= len(rows.rows[r])  # each conversation from 0 (and the padding after them)
    for start in starts:
        assert item["labels"][start] == -100  # never predicted from the conversation before it
    text = tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert "<|im_end|>" in text and "user" not in text and "system" not in text
    first = json.loads((chat / "chat.jsonl").read_text().splitlines()[rows.rows[r][0]])["messages"]
    answer = next(m["content"] for m in first if m["role"] == "assistant")
    assert answer.split()[0] in text


@pytest.mark.parametrize("packing", [False, True])
def test_the_first_steps_loss_is_plain_transformers_assistant_only_loss(chat, tmp_path, packing):
    from accel_trainer.data.chat import best_fit

    conversations = rendered(chat)
    train = conversations[:-round(len(conversations) * 0.05)]
    rows = len(best_fit([len(ids) for ids, _ in train], BLOCK)) if packing else len(train)
    # Packed, the rows fall into two micro-batches: the step's loss is still the mean over all targets.
    accumulation = 2 if packing and rows % 2 == 0 else 1
    args = ["--model_name_or_path", str(chat / "llama"), "--chat_data", str(chat / "chat.jsonl"), "--block_size",
            str(BLOCK), "--per_device_train_batch_size", str(rows // accumulation), "--gradient_accumulation_steps",
            str(accumulation), "--max_steps", "1", "--eval_steps", "0", *COMMON, "--output_dir", str(tmp_path)]
    proc = launch_here(args + (["--packing"] if packing else []), script=CAUSAL_LM)
    assert f"{len(conversations)} conversations" in proc.stdout
    loss = read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"]
    assert loss == pytest.approx(reference_loss(chat, train), rel=2e-6)


def test_a_template_without_generation_markers_is_one_line(chat, tmp_path):
    tokenizer = tmp_path / "tok"
    shutil.copytree(chat / "llama", tokenizer)
    template = (tokenizer / "chat_template.jinja").read_text()
    (tokenizer / "chat_template.jinja").write_text(template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""))
    proc = launch_here(["--model_name_or_path", str(chat / "llama"), "--tokenizer_name", str(tokenizer),
                        "--chat_data", str(chat / "chat.jsonl"), "--max_steps", "1", *COMMON,
                        "--output_dir", str(tmp_path / "run")], check=False, script=CAUSAL_LM)
    assert proc.returncode == 2
    assert "has no {% generation %} markers" in proc.stderr and "Traceback" not in proc.stderr


LORA = ["--lora_r", "4", "--learning_rate", "0.01", "--block_size", str(BLOCK), "--packing",
        "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2"]


def test_lora_checkpoints_hold_the_adapters_and_both_exports_give_the_same_logits(chat, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from accel_trainer import load_model_for_inference
    from accel_trainer.checkpoint import read_tensor_file
    from accel_trainer.cli import main as cli

    run = tmp_path / "run"
    base_args = ["--model_name_or_path", str(chat / "llama"), "--chat_data", str(chat / "chat.jsonl"), *COMMON]
    launch_here([*base_args, *LORA, "--output_dir", str(run)], script=CAUSAL_LM)
    step = run / "checkpoints" / "step-4"
    saved = read_tensor_file(step / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(chat / "llama")
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # the adapters, nothing of the base
    assert not list(step.glob("model.frozen*"))
    adapter_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    weights_and_state = sum(p.stat().st_size for p in step.glob("*.safetensors"))
    assert weights_and_state < 3 * adapter_bytes + 65536 < base_bytes  # adapters + 2 Adam moments (+ headers)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)  # it trained

    assert cli(["export", str(step), str(tmp_path / "adapter")]) == 0
    assert cli(["export", str(step), str(tmp_path / "merged"), "--merge_lora"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        untouched = AutoModelForCausalLM.from_pretrained(chat / "llama")
        peft_logits = PeftModel.from_pretrained(untouched, tmp_path / "adapter").eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        ours = load_model_for_inference(step, device="cpu")[0](ids).logits
        again = load_model_for_inference(tmp_path / "adapter", device="cpu")[0](ids).logits
        base_logits = base.eval()(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours, peft_logits) and torch.equal(again, peft_logits)
    assert not torch.allclose(base_logits, peft_logits)  # the adapters change the model

    # A resume on a base whose tensors changed is refused in one line, naming it.
    changed = tmp_path / "base"
    shutil.copytree(chat / "llama", changed)
    with torch.no_grad():
        base.model.norm.weight.add_(0.5)
    base.save_pretrained(changed)
    proc = launch_here(["--model_name_or_path", str(changed), "--chat_data", str(chat / "chat.jsonl"), *COMMON,
                        *LORA[:-6], "--max_steps", "6", "--output_dir", str(run), "--resume_from_checkpoint", "latest",
                        "--tokenizer_name", str(chat / "llama")], check=False, script=CAUSAL_LM)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "its LoRA adapters were trained on the base" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("extra, expected", [
    (["--load_in_4bit"], "--load_in_4bit: QLoRA's 4-bit base runs on CUDA GPUs only"),
    (["--vocab_size", "512"], "--vocab_size=512 with --lora_r"),
    (["--freeze_params", "embed"], "--lora_r and --freeze_params"),
    (["--lora_target_modules", "no_such_proj"], "--lora_target_modules: "),
])
def test_lora_flags_that_cannot_work_are_one_line(chat, tmp_path, extra, expected):
    proc = launch_here(["--model_name_or_path", str(chat / "llama"), "--chat_data", str(chat / "chat.jsonl"),
                        "--lora_r", "4", "--max_steps", "1", *COMMON, *extra, "--output_dir", str(tmp_path)],
                       check=False, script=CAUSAL_LM)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]


def test_chat_flags_that_cannot_work_are_one_line(chat, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cases = [(["--packing"], "--packing: only used with --chat_data"),
             (["--chat_data", str(bad)], f"--chat_data {bad}:1: no assistant message"),
             (["--chat_data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file")]
    for extra, expected in cases:
        proc = launch_here(["--model_name_or_path", str(chat / "llama"), "--max_steps", "1", *COMMON, *extra,
                            "--output_dir", str(tmp_path / "run")], check=False, script=CAUSAL_LM)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]


def test_rendering_in_several_processes_writes_the_same_bytes(chat, tmp_path):
    from transformers import AutoTokenizer

    from accel_trainer.data.chat import CHUNK, prepare_chat
    from chat_models import conversations

    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations(2 * CHUNK + 7)))
    tokenizer = AutoTokenizer.from_pretrained(chat / "llama")
    one, two = (prepare_chat([str(data)], tokenizer, tmp_path / f"p{n}", {"n": n}, progress=False, num_proc=n)
                for n in (1, 2))
    assert one["xxh3_128"] == two["xxh3_128"] and one["conversations"] == 2 * CHUNK + 7

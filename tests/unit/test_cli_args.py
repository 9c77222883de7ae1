"""Bad flags: one line on stderr naming the flag, exit status 2, no traceback (the recipe's main() is
called in-process; the console script and the recipe as a program are launched once each)."""


import pytest
import torch



@pytest.fixture
def recipe(recipe_module, capsys):
    def run(*args):
        try:
            code = recipe_module.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        return code, capsys.readouterr().err

    return run


def test_bad_values_exit_2_naming_every_flag(recipe):
    code, err = recipe("--mixed_precision", "fp8", "--per_device_train_batch_size", "0")
    assert code == 2
    assert "--mixed_precision='fp8'" in err
    assert "--per_device_train_batch_size=0: must be >= 1" in err
    assert "Traceback" not in err


def test_non_numeric_value_exits_2(recipe):
    code, err = recipe("--max_steps", "ten")
    assert code == 2 and "--max_steps" in err


def test_unknown_preset_exits_2_listing_presets(recipe, tmp_path):
    code, err = recipe("--preset", "huge", "--output_dir", str(tmp_path), "--report_to", "none")
    assert code == 2
    assert "--preset='huge': unknown; choose one of 18b, b200, 4090, tiny" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 works where there is a GPU")
def test_fp16_on_cpu_is_a_clear_error(recipe, tmp_path):
    code, err = recipe("--mixed_precision", "fp16", "--output_dir", str(tmp_path), "--report_to", "none")
    assert code == 2
    assert "--mixed_precision=fp16 needs a CUDA GPU" in err


@pytest.mark.parametrize("flag,advice", [
    ("--eval_strategy", "evaluation runs every --eval_steps steps"),
    ("--save_strategy", "save with --save_steps N and/or --save_on_each_epoch"),
    ("--load_best_model_at_end", "checkpoints/best"),
    ("--push_to_hub", "accel-trainer export"),
    ("--hub_model_id", "accel-trainer export"),
])
def test_hf_trainer_flags_say_what_to_use_instead(recipe, flag, advice):
    code, err = recipe(flag, "steps")
    assert code == 2 and "Traceback" not in err
    assert f"{flag}: not a flag here (an HF Trainer flag)" in err and advice in err


def test_a_mistyped_flag_gets_the_closest_ones(recipe):
    code, err = recipe("--learnig_rate", "0.1", "--max_stepz", "5")
    assert code == 2
    assert "--learnig_rate: unknown flag; did you mean --learning_rate" in err
    assert "--max_stepz: unknown flag; did you mean --max_steps" in err
    assert "--max-steps" not in err  # HfArgumentParser's dashed aliases are not suggested


def test_hf_aliases_bf16_fp16_warmup_ratio_and_schedule_names():
    from accel_trainer.config import ConfigError, TrainingArguments

    assert TrainingArguments(bf16=True).mixed_precision == "bf16"
    assert TrainingArguments(fp16=True, mixed_precision="fp16").mixed_precision == "fp16"
    with pytest.raises(ConfigError, match="--bf16 and --fp16: give one"):
        TrainingArguments(bf16=True, fp16=True)
    with pytest.raises(ConfigError, match="--bf16 and --mixed_precision=fp16: they disagree"):
        TrainingArguments(bf16=True, mixed_precision="fp16")
    assert TrainingArguments(lr_scheduler_type="cosine_with_min_lr").lr_scheduler_type == "cosine"
    assert TrainingArguments(lr_scheduler_type="constant_with_warmup").lr_scheduler_type == "constant"
    assert TrainingArguments(warmup_ratio=0.05).warmup_for(200) == 10
    assert TrainingArguments(warmup_steps=3).warmup_for(200) == 3 and TrainingArguments().warmup_for(200) == 10
    with pytest.raises(ConfigError, match="--warmup_steps=3 and --warmup_ratio=0.1: give one"):
        TrainingArguments(warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match=r"--warmup_ratio=1.5: must be in \[0, 1\)"):
        TrainingArguments(warmup_ratio=1.5)


def test_linear_schedule_decays_to_the_min_ratio_and_holds():
    from accel_trainer.optim import lr_multiplier

    f = [lr_multiplier(s, kind="linear", warmup_steps=2, total_steps=12, min_lr_ratio=0.1) for s in range(14)]
    assert f[:2] == [0.5, 1.0] and f[2] == 1.0 and f[7] == pytest.approx(0.55) and f[12] == f[13] == pytest.approx(0.1)


def test_run_name_defaults_to_the_output_dirs_name():
    from accel_trainer.config import TrainingArguments

    assert TrainingArguments(output_dir="runs/exp7/").tracker_run_name == "exp7"
    assert TrainingArguments(output_dir="runs/exp7", run_name="ablation").tracker_run_name == "ablation"


def test_weight_decay_is_adamws_on_matrices_and_muon_has_its_own():
    from accel_trainer.models import MoEConfig, MoEForCausalLM
    from accel_trainer.optim import OptimizerSettings, build_optimizers

    model = MoEForCausalLM(MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                                     num_experts_per_tok=2, shared_expert_intermediate_size=8))
    opts = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.1,
                                                     muon_weight_decay=0.01)).optimizers
    decayed, plain = opts["adamw"].param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert "model.embed_tokens.weight" in decayed["param_names"]
    assert all("norm" in n for n in plain["param_names"])
    assert {g["weight_decay"] for g in opts["muon"].param_groups} == {0.01}
    no_decay = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=3e-3)).optimizers
    assert len(no_decay["adamw"].param_groups) == 1  # the layout older checkpoints have


@pytest.mark.parametrize("flag, env, expected", [(None, "bf16", "bf16"), ("no", "bf16", "no"), (None, None, "no")])
def test_mixed_precision_follows_the_accelerate_config_unless_the_flag_is_given(tmp_path, monkeypatch, flag, env,
                                                                                expected):
    """`accelerate launch --config_file accelerate_configs/<env>.yaml` exports the file's mixed_precision;
    a flag default of "no" used to override it (found on the first GPU run: the FSDP config's bf16
    trained in fp32). The arguments are not changed; the run records the accelerator's value."""
    from accelerate.state import AcceleratorState

    from accel_trainer.config import TrainingArguments
    from accel_trainer.trainer import build_accelerator

    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", mixed_precision=flag)
    AcceleratorState._reset_state(True)
    try:
        accelerator = build_accelerator(args)
        assert (str(accelerator.mixed_precision), args.mixed_precision) == (expected, flag)
    finally:
        AcceleratorState._reset_state(True)


def test_object_storage_flags_fail_in_one_line_before_any_work(recipe, tmp_path):
    code, err = recipe("--output_dir", str(tmp_path), "--checkpoint_upload_to", "nosuchscheme://bucket/run")
    assert code == 2 and "--checkpoint_upload_to: nosuchscheme://bucket/run: cannot open this storage" in err
    code, err = recipe("--output_dir", str(tmp_path), "--checkpoint_upload_to", "s3://b/r", "--storage_options", "{bad")
    assert code == 2 and "--storage_options: not JSON" in err
    assert not (tmp_path / "data").exists()  # nothing was tokenised

"""Bad flags: one line on stderr naming the flag, exit status 2, no traceback (the recipe's main() is
called in-process; the console script and the recipe as a program are launched once each)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, RECIPE


@pytest.fixture
def recipe(recipe_module, capsys):
    def run(*args):
        try:
            code = recipe_module.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        return code, capsys.readouterr().err

    return run


def test_unknown_flag_exits_2_naming_it_as_a_program():
    proc = subprocess.run([sys.executable, str(RECIPE), "--max_stepz", "5"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "--max_stepz" in proc.stderr
    assert "Traceback" not in proc.stderr


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


def test_console_script_params_and_env(tmp_path, recipe_module):
    (tmp_path / "config.json").write_text(json.dumps(recipe_module.PRESETS["18b"]))
    proc = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "params", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["total"] - 18e9) < 0.05 * 18e9
    missing = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "params", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no config.json at" in missing.stderr

import subprocess
import sys

from conftest import REPO, RECIPE


def run_recipe(*args):
    return subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_unknown_flag_exits_2_naming_it():
    proc = run_recipe("--max_stepz", "5")
    assert proc.returncode == 2
    assert "--max_stepz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_values_exit_2_naming_every_flag():
    proc = run_recipe("--mixed_precision", "fp8", "--per_device_train_batch_size", "0")
    assert proc.returncode == 2
    assert "--mixed_precision='fp8'" in proc.stderr
    assert "--per_device_train_batch_size=0: must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_numeric_value_exits_2():
    proc = run_recipe("--max_steps", "ten")
    assert proc.returncode == 2 and "--max_steps" in proc.stderr


def test_unknown_preset_exits_2_listing_presets(tmp_path):
    proc = run_recipe("--preset", "huge", "--output_dir", str(tmp_path), "--report_to", "none")
    assert proc.returncode == 2
    assert "--preset='huge': unknown; choose one of 18b, b200, 4090, tiny" in proc.stderr


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = run_recipe("--mixed_precision", "fp16", "--output_dir", str(tmp_path), "--report_to", "none")
    assert proc.returncode == 2
    assert "--mixed_precision=fp16 needs a CUDA GPU" in proc.stderr


def test_console_script_params_and_env(tmp_path):
    import json

    sys.path.insert(0, str(REPO))
    from recipes.moe18b import PRESETS

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["18b"]))
    proc = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "params", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["total"] - 18e9) < 0.05 * 18e9
    missing = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "params", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no config.json at" in missing.stderr

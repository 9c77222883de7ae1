"""The recipe and the console script as programs: exit statuses and one-line errors of real processes."""

import json
import subprocess
import sys


from launching import REPO, RECIPE


def test_unknown_flag_exits_2_naming_it_as_a_program():
    proc = subprocess.run([sys.executable, str(RECIPE), "--max_stepz", "5"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "--max_stepz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_params_and_env(tmp_path, recipe_module):
    (tmp_path / "config.json").write_text(json.dumps(recipe_module.PRESETS["18b"]))
    proc = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "params", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["total"] - 18e9) < 0.05 * 18e9
    missing = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "params", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no config.json at" in missing.stderr

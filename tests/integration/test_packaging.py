"""What a user installs: the docs build strictly, and a regular (non-editable) install works from
any folder, with the presets inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from launching import REPO


def test_the_docs_build_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "checkpoints" / "index.html").is_file()


def test_a_regular_install_plans_the_18b_preset_from_any_folder(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ beside the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache", "tests", "docs"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("accel_trainer-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import sys, accel_trainer; from accel_trainer.cli import main; print('from', accel_trainer.__file__); "
            "sys.exit(main(['plan', '--preset', '18b', '--num_gpus', '8']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from {site}" in proc.stdout
    assert "preset 18b: 17.96B parameters; FSDP2 over 8 GPUs" in proc.stdout

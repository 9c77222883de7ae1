"""The benchmark scripts still run and print their tables, at tiny sizes through every code path of
their default run (the trainer's logging steps, saves and uploads); no timing is asserted."""

import subprocess
import sys

import pytest

from launching import REPO



@pytest.mark.parametrize("script,args,expect", [
    ("checkpoint.py", ["--size_gb", "0.05", "--repeats", "1", "--upload_to", "moto"], "upload: ours vs plain s3fs put"),
    ("step_overhead.py", ["--steps", "3", "--rounds", "1", "--logging_steps", "2"], "logging steps among them: 4"),
    ("muon.py", ["--world_sizes", "2", "4"], "less work"),
    ("moe.py", ["--tokens", "256", "--repeats", "2"], "ratio hf block own grouped_mm / on our engine"),
    # Every variant of the default run (compiled and activation-checkpointed too) and the profile.
    ("mfu.py", ["--preset", "tiny", "--layers", "2", "--block_size", "64", "--batch_size", "2", "--steps", "1",
                "--warmup", "1"], "router + permutation"),
    ("cli_startup.py", ["--repeats", "1"], "accel-trainer inspect"),
    ("data.py", ["--corpus_bytes", "300000", "--num_proc", "1", "--vocab_size", "400", "--block_size", "256"],
     "skip_first_batches"),
    ("fine_tuning.py", ["--conversations", "40", "--steps", "2", "--timing_steps", "2", "--adamw_lrs", "1e-3",
                        "--muon_lrs", "0.02", "--block_size", "256"], "ratio muon / adamw val loss"),
])
def test_benchmark_prints_its_table(script, args, expect):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout

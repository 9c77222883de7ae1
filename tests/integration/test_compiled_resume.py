"""A run compiled with --torch_compile (regional, aot_eager) resumes an eager checkpoint and the
reverse, with the eager run's losses: compiled modules keep the parameter names checkpoints use.
In the integration lane: compiling takes seconds even for the tiny preset."""

from __future__ import annotations

import shutil

import pytest

from launching import TINY, read_jsonl

COMPILE = ["--torch_compile", "--torch_compile_backend", "aot_eager"]


def test_a_compiled_run_resumes_an_eager_checkpoint_and_the_reverse(recipe_module, tmp_path, capsys):
    args = [*TINY, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "0", "--logging_steps", "1"]
    assert recipe_module.main([*args, "--output_dir", str(tmp_path / "eager")]) == 0
    reference = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "eager" / "metrics.jsonl")}
    shutil.copytree(tmp_path / "eager", tmp_path / "to_compiled", ignore=shutil.ignore_patterns("step-4", ".lock"))
    assert recipe_module.main([*args, *COMPILE, "--max_steps", "2", "--output_dir", str(tmp_path / "to_eager")]) == 0
    for name, resume_args in (("to_compiled", COMPILE), ("to_eager", [])):
        out = tmp_path / name
        assert recipe_module.main([*args, *resume_args, "--output_dir", str(out), "--resume_from_checkpoint",
                                   "step-2"]) == 0
        got = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
        assert sorted(got) == [1, 2, 3, 4]
        for step in (3, 4):
            assert got[step] == pytest.approx(reference[step], rel=1e-4), (name, step)
    assert "decoder layers compiled one by one" in capsys.readouterr().out

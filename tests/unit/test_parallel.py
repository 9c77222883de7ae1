"""Expert parallelism's pieces that need no second process: its flag's errors (one line, exit 2,
before any work) and the gradient clipping that spans every parameter layout. The collectives are
tested on real gloo ranks in tests/integration/test_expert_parallel.py."""

import pytest
import torch

from accel_trainer.parallel import clip_grad_norm_
from accel_trainer.run import main


def run_main(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_expert_parallel_size_must_divide_the_processes(capsys, tmp_path):
    code, err = run_main(capsys, "--preset", "tiny", "--expert_parallel_size", "2", "--output_dir", str(tmp_path),
                         "--report_to", "none", "--max_corpus_bytes", "20000")
    assert code == 2 and "Traceback" not in err
    assert "--expert_parallel_size=2 must divide the number of processes (1); use one of [1]" in err
    assert not (tmp_path / "data").exists()  # refused before the data was prepared


def test_expert_parallel_size_below_one_is_refused(capsys, tmp_path):
    code, err = run_main(capsys, "--expert_parallel_size", "0", "--output_dir", str(tmp_path))
    assert code == 2 and "--expert_parallel_size=0: must be >= 1" in err


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    norm = clip_grad_norm_(ours, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)

"""Files users and CI rely on stay consistent."""

from launching import REPO


def test_ci_runs_the_readme_test_command_verbatim():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command and "torch==2.13.0" in command
    assert command in (REPO / "README.md").read_text()


def test_pyproject_keeps_a_torch_range_not_a_pin():
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.9"' in text and "torch==" not in text

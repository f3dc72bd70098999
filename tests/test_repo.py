"""The README's commands are the ones CI runs."""
from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command and ci_command in (ROOT / "README.md").read_text()


def test_requirements_are_pinned():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert {line.split("==")[0] for line in lines} >= {"torch", "torchvision", "numpy", "matplotlib", "tqdm"}
    assert all("==" in line for line in lines)

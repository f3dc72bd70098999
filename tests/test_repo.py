"""The README's commands are the ones CI runs."""
from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command and ci_command in (ROOT / "README.md").read_text()


def test_requirements_are_pinned():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert {line.split("==")[0] for line in lines} >= {"torch", "torchvision", "numpy", "matplotlib", "tqdm"}
    assert all("==" in line for line in lines)


def test_readme_tables_are_the_committed_summaries():
    """Every table the README shows between summary markers is, byte for byte, the summary.md it names."""
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("<!-- begin ")[1:]
    assert blocks, "the README shows no committed summary"
    for block in blocks:
        path, rest = block.split(" -->\n", 1)
        shown = rest.split(f"<!-- end {path} -->")[0]
        assert shown == (ROOT / path).read_text(), path

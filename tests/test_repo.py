"""The README's commands are the ones CI runs."""
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command and ci_command in (ROOT / "README.md").read_text()


def test_requirements_are_pinned():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert {line.split("==")[0] for line in lines} >= {"torch", "torchvision", "numpy", "matplotlib", "tqdm"}
    assert all("==" in line for line in lines)


def test_the_tables_the_pages_show_are_the_committed_files():
    """Every table the README or a docs page shows between markers is, byte for byte, the file it names."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    shown_somewhere = 0
    for page in pages:
        for block in page.read_text().split("<!-- begin ")[1:]:
            path, rest = block.split(" -->\n", 1)
            shown = rest.split(f"<!-- end {path} -->")[0]
            assert shown == (ROOT / path).read_text(), (page.name, path)
            shown_somewhere += 1
    assert shown_somewhere, "no page shows a committed table"


def test_the_readme_example_of_the_head_runs_from_outside_the_repo(tmp_path):
    """The snippet under 'Use the head in your own model', as it stands, with nn.py copied in as msd.py."""
    section = (ROOT / "README.md").read_text().split("## Use the head in your own model")[1]
    snippet = section.split("```python\n")[1].split("```")[0]
    shutil.copy(ROOT / "nn.py", tmp_path / "msd.py")
    (tmp_path / "example.py").write_text(snippet)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-800:]
    assert result.stdout.startswith("loss ") and result.stdout.strip().endswith("predictions (32,)")


def test_no_page_speaks_of_how_it_was_made():
    """The README and docs/ are for users: no sessions, lending, teams or issues; the blog's code is not 'seed'."""
    words = re.compile(r"\b(sessions?|lent|the team|the issue|seed repo|seed-style|seed 001)\b")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:  # the committed tables too
        assert not words.findall(page.read_text().lower()), (page.name, words.findall(page.read_text().lower()))
    for source in ROOT.glob("*.py"):
        text = source.read_text().lower()
        assert not [w for w in ("seed 001", "seed repo", "seedstyle", "seed_recipe") if w in text], source.name


def heading_anchors(page):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_and_anchor_in_the_pages_leads_somewhere():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
                broken.append(f"{page.name}: {target}")
    assert not broken

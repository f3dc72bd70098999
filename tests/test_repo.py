"""The README and docs: their commands are the ones CI runs, their snippets run, and their numbers are the
committed tables'."""
import csv
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import study
from bookkeeping import runfiles
from conftest import ROOT, SHARED_ARCHIVE
from studies import stats
from studies.tables import mean_std


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


@pytest.mark.slow
def test_the_readme_example_of_the_head_runs_from_outside_the_repo(tmp_path):
    """The snippet under 'Use the head in your own model', as it stands, with nn.py copied in as msd.py."""
    section = (ROOT / "README.md").read_text().split("## Use the head in your own model")[1].split("\n## ")[0]
    snippet = "".join(block.split("```")[0] for block in section.split("```python\n")[1:])  # the example, the options
    shutil.copy(ROOT / "nn.py", tmp_path / "msd.py")
    (tmp_path / "example.py").write_text(snippet)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-800:]
    assert result.stdout.startswith("loss ") and result.stdout.strip().endswith("pooled map: logits (32, 5)")


@pytest.mark.slow
def test_the_readmes_quick_check_runs_as_written_with_the_offline_copy(tmp_path):
    section = (ROOT / "README.md").read_text().split("## Quick check")[1].split("\n## ")[0]
    (command,) = section.split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert command.startswith(".venv/bin/python run.py ") and command in (ROOT / "README.md").read_text().split("## Set up")[1]
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"the offline copy is not at {SHARED_ARCHIVE}")
    argv = [sys.executable, *shlex.split(command)[1:], "--data_dir", str(SHARED_ARCHIVE), "--output_dir", str(tmp_path)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-800:]
    (metrics,) = tmp_path.glob("*/metrics.json")
    assert [row["epoch"] for row in runfiles.read_json(metrics)] == [1, 2] and "2000 train / 1000 test" in result.stdout


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


def table_rows(path, header):
    """The rows of the table in a committed NAME.md that starts with header, as lists of cells."""
    block = next(b for b in (ROOT / path).read_text().split("\n\n") if b.startswith(header))
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in block.splitlines()[2:]]


def blog_final(setting):
    with open(ROOT / "blog_curves.csv", newline="") as f:
        return next(float(r["epoch20"]) for r in csv.DictReader(f) if (r["metric"], r["setting"]) == ("valid_acc", setting))


def headline_cells(folder):
    """The README's cells for one study folder's convergence.md: Δ final valid acc of M=8 and M=0 against M=1, Δ final
    training loss and Δ epochs to target of M=8 against M=1, each with its seeds or pairs."""
    path = f"docs/{folder}/convergence.md"
    compared = {row[0]: row for row in table_rows(path, "| comparison | seeds paired |")}
    epochs = {row[0]: row for row in table_rows(path, "| comparison | pairs | Δ epochs")}
    last_epoch = table_rows(path, "| epoch |")[-1]
    cells = [f"{compared[label][2].rstrip(' *')}, {compared[label][1]} seeds" for label in ("M=8 − M=1", "M=0 − M=1")]
    seeds = compared["M=8 − M=1"][1]
    cells += [f"{last_epoch[2].rstrip(' *')}, {seeds} seeds", f"{epochs['M=8 − M=1'][2]}, {epochs['M=8 − M=1'][1]} pairs"]
    return [cell.replace("-", "−") for cell in cells]


def test_the_readmes_headline_table_is_the_committed_tables():
    """Each row of the answer: the blog's one run each, then ours at full scale (docs/study-full) and on the
    converged protocol (docs/study-converged), from their convergence.md; the cost from the Xeon's bench."""
    readme = (ROOT / "README.md").read_text()
    full, converged = headline_cells("study-full"), headline_cells("study-converged")
    m8, m1, m0 = (blog_final(s) for s in ("8 sample", "1 sample", "no dropout"))
    blog = [f"{m8 - m1:+.4f} ({m8:.4f} against {m1:.4f})", f"{m0 - m1:+.4f} ({m0:.4f} against {m1:.4f})"]
    claims = ["lower error: Δ final valid accuracy, M=8 − M=1", "dropout at all: Δ final valid accuracy, M=0 − M=1",
              "faster convergence: Δ final training loss, M=8 − M=1",
              "fewer epochs: Δ epochs to one point below M=1's mean final, M=8 − M=1"]
    blog += ["not comparable (its M=8 loss is another quantity)", "not measured"]
    for claim, ours_full, ours_converged, theirs in zip(claims, full, converged, blog):
        row = f"| {claim} | {theirs.replace('-', '−')} | {ours_full} | {ours_converged} |"
        assert row in readme, row
    (overhead,) = [row for row in table_rows("docs/bench-xeon/bench.md", "| dropout_num | ms/step") if row[0] == "8"]
    assert f"| little extra cost: a training step, M=8 against M=0 | not measured | {overhead[2]}x (bf16, batch 128) |" in readme


def answer_rows(accuracies):
    """A page's rows for {M: {seed: final valid acc}}: mean ± std, and the paired difference from M=1."""
    rows = []
    for m, finals in accuracies.items():
        d = stats.paired_by_seed(finals, accuracies[1]) if m != 1 else None
        difference = f"{stats.format_difference(d)} | {d['higher']} / {d['lower']}" if d else "|"
        rows.append(f"| {m} | {mean_std(list(finals.values()))} | {difference} |".replace("-", "−"))
    return "\n".join(rows)


def test_the_samples_table_of_the_paper_figures_page_is_what_the_committed_runs_give():
    samples = study.STUDIES["samples"]
    points = study.collect(ROOT / "docs" / "study-converged", samples)
    accuracies = {point.dropout_num: {seed: acc for seed, acc in runfiles.final_accuracies(runs).items()
                                      if seed in study.own_seeds(samples)} for point, runs in points.items()}
    assert len(accuracies) == 7 and all(len(finals) == 5 for finals in accuracies.values())
    assert answer_rows(accuracies) in (ROOT / "docs" / "paper-figures.md").read_text(), answer_rows(accuracies)


def test_the_full_scale_numbers_the_gpu_pages_quote_are_the_committed_h200_table():
    """gpu-study.md shows the H200s' comparison rows and each setting's final accuracies; full-scale.md quotes both
    intervals."""
    comparisons = table_rows("docs/study-full-h200/convergence.md", "| comparison | seeds paired |")
    page = (ROOT / "docs" / "gpu-study.md").read_text()
    assert len(comparisons) == 2 and all("| " + " | ".join(row[:-1]) + " |" in page.splitlines() for row in comparisons)
    for cells in table_rows("docs/study-full-h200/convergence.md", "| setting | M |"):
        assert f"| {cells[3]} | {cells[4]} | {cells[6]}" in page, cells
    full_scale = (ROOT / "docs" / "full-scale.md").read_text().replace("\n", " ")
    assert all(row[2].replace("-", "−") in full_scale for row in comparisons), comparisons


def test_the_tree_shows_the_architecture():
    """At the root the commands and the files of one run; the rest in folders a first reading can skip; no file of
    code past 350 lines."""
    commands = {"run.py", "study.py", "bench.py", "stepprofile.py", "blog.py", "regression.py"}
    one_run = {"nn.py", "train.py", "datasource.py", "trainingmonitor.py", "graphstep.py", "progressbar.py", "tools.py"}
    assert {p.name for p in ROOT.glob("*.py")} == commands | one_run
    for folder in ("bookkeeping", "studies", "benchmarks"):
        assert (ROOT / folder / "__init__.py").read_text().startswith('"""'), folder  # says what the folder holds
    code = [p for p in ROOT.rglob("*.py") if not {".venv", "outputs", "data"} & set(p.relative_to(ROOT).parts)]
    assert not [(p.name, n) for p in code if (n := len(p.read_text().splitlines())) > 350]

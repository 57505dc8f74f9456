"""The README stays a short user guide whose layout table matches the package tree, and the
benchmark's own README holds the method and the measured goals (offline, reads files only)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCH_README = ROOT / "detox_lightning" / "bench" / "README.md"
MAX_README_LINES = 360

# A table row whose first cell is one backticked path ending in "/": `| `detox_lightning/rl/` | ... |`.
LAYOUT_ROW = re.compile(r"^\|\s*`([^`|]+/)`\s*\|")
ISSUE_REFERENCE = re.compile(r"\b[Ii]ssues?\s+#?\d+|#\d+")


LAYOUT_HEADING = "## Project layout"


def layout_section(readme_text: str) -> str:
    """The README's "Project layout" section (up to the next "## " heading); empty when there is none."""
    _, found, rest = readme_text.partition(LAYOUT_HEADING + "\n")
    return re.split(r"^## ", rest, maxsplit=1, flags=re.MULTILINE)[0] if found else ""


def listed_directories(readme_text: str) -> list[str]:
    """The directories the layout table lists, in order (duplicates kept), without the trailing "/"."""
    return [m.group(1).rstrip("/") for line in layout_section(readme_text).splitlines() if (m := LAYOUT_ROW.match(line))]


def package_directories(root: Path, package: str = "detox_lightning") -> set[str]:
    """Every directory of `package` under `root` that holds an `__init__.py`, as a path relative to root."""
    return {init.parent.relative_to(root).as_posix() for init in (root / package).rglob("__init__.py")}


def layout_problems(readme_text: str, root: Path, package: str = "detox_lightning") -> list[str]:
    """What is wrong with the README's layout table against the tree under `root` (empty: nothing)."""
    listed = listed_directories(readme_text)
    problems = [f"{d}/ has no row in the README's layout table" for d in sorted(package_directories(root, package) - set(listed))]
    problems += [f"{d}/ is listed in the layout table but does not exist" for d in listed if not (root / d).is_dir()]
    problems += [f"{d}/ has more than one row in the layout table" for d in sorted({d for d in listed if listed.count(d) > 1})]
    return problems


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; a user guide keeps to {MAX_README_LINES}"


def test_readme_names_no_issue_numbers():
    found = [
        f"line {n}: {m.group(0)!r}"
        for n, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1)
        for m in ISSUE_REFERENCE.finditer(line)
    ]
    assert not found, "README.md refers to issues by number: " + "; ".join(found)


def test_layout_table_matches_the_package_tree():
    text = README.read_text(encoding="utf-8")
    assert "detox_lightning" in listed_directories(text), "the layout table has no row for detox_lightning/"
    assert layout_problems(text, ROOT) == []


def test_layout_check_catches_a_package_without_a_row_and_a_row_without_a_directory(tmp_path):
    for package in ("detox_lightning", "detox_lightning/rl", "detox_lightning/rl/estimators", "detox_lightning/new"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "detox_lightning" / "__pycache__").mkdir()  # no __init__.py: not a package
    (tmp_path / "configs").mkdir()
    text = f"## Outputs\n| `adapter/` | an output folder, not a layout row |\n{LAYOUT_HEADING}\n| path | what |\n| --- | --- |\n| `detox_lightning/` | top level |\n| `detox_lightning/rl/` | RL math |\n| `detox_lightning/rl/estimators/` | estimators |\n| `detox_lightning/gone/` | removed |\n| `configs/` | configs |\n| `constraints.txt` | not a directory: not a layout row |\n## Tests\n| `tests/` | after the layout section: not a layout row |"
    assert layout_problems(text, tmp_path) == [
        "detox_lightning/new/ has no row in the README's layout table",
        "detox_lightning/gone/ is listed in the layout table but does not exist",
    ]
    fixed = text.replace("| `detox_lightning/gone/` | removed |", "| `detox_lightning/new/` | new |")
    assert layout_problems(fixed, tmp_path) == []
    twice = fixed.replace("| `configs/` | configs |", "| `configs/` | configs |\n| `detox_lightning/rl/` | again |")
    assert layout_problems(twice, tmp_path) == ["detox_lightning/rl/ has more than one row in the layout table"]


def test_layout_check_on_the_real_readme_without_one_row():
    text = README.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `detox_lightning/rl/` |"))
    assert layout_problems(text.replace(row + "\n", ""), ROOT) == ["detox_lightning/rl/ has no row in the README's layout table"]


def test_issue_reference_pattern():
    assert ISSUE_REFERENCE.search("Issue 16's goals")
    assert ISSUE_REFERENCE.search("as in issue 7")
    assert ISSUE_REFERENCE.search("see #42")
    assert not ISSUE_REFERENCE.search("#Person1# and #Person2# plan a party")


def test_bench_readme_has_the_method_and_the_goals():
    assert BENCH_README.is_file(), "detox_lightning/bench/README.md is missing"
    text = BENCH_README.read_text(encoding="utf-8")
    assert "## Method" in text
    for needle in ("python -m detox_lightning.bench", "notebook's loop", "floor", "peak RSS", "VmHWM"):
        assert needle in text, f"the benchmark README's method does not mention {needle!r}"
    goals = text.split("### The CPU speed goals", 1)
    assert len(goals) == 2, "the benchmark README has no 'The CPU speed goals' section"
    assert re.search(r"^\| goal \| measured .*\| met \|$", goals[1], re.MULTILINE), "the CPU speed goals section has no goals table"
    assert "detox_lightning/bench/README.md" in README.read_text(encoding="utf-8"), "README.md does not link the benchmark README"


def readme_test_command(readme_text: str) -> str:
    """The first command of the README's "## Tests" bash block, without its comment."""
    section = readme_text.partition("## Tests\n")[2]
    block = section.partition("```bash\n")[2].partition("```")[0]
    return block.splitlines()[0].partition("#")[0].strip() if block else ""


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_test_command(README.read_text(encoding="utf-8"))
    assert command.startswith("python -m pytest"), f"the README's Tests section starts with {command!r}"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"


def test_readme_test_command_is_read_from_the_tests_block():
    text = "## Tests\n\n```bash\npython -m pytest -q -n 3   # all\npython -m pytest -q -m x\n```\n"
    assert readme_test_command(text) == "python -m pytest -q -n 3"
    assert readme_test_command("## Tests\n\nno block\n") == ""

"""The house rules that a tool can check: ruff's lint (lines of at most 100 characters), no
experiment logs in the package's comments, and no reference to a file outside the repository."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmark recordings, dated experiment rounds and the old diary: they belong in BENCHMARKS.md
# and docs/design-decisions.md, not in the code
LOG_LIKE = re.compile(r"NOTES\.md|session \d|\bnp(64|128)\b|\bsq_\d|research\.md|shared/")


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or pytest.fail("ruff is missing: pip install -e '.[test]'")
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_carries_no_experiment_logs():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "locsort").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if LOG_LIKE.search(line)
    ]
    assert not found, "\n".join(found)


def test_no_file_refers_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    # the shared MEArec template libraries are data the benchmarks read, not documents
    outside = re.compile(r"shared/(design|seeds)|research\.md|NOTES\.md")
    found = [
        name
        for name in tracked.stdout.split()
        if name.endswith((".py", ".md", ".toml"))
        and name != "tests/test_style.py"
        and (ROOT / name).exists()
        and outside.search((ROOT / name).read_text())
    ]
    assert not found, found

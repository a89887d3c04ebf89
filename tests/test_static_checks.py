"""The linter and the type checker over the package, as part of the suite: CI runs only the README's test command,
so a check kept outside it stops being run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    done = _run("ruff", "check", "nla_lens", "tests", "docs", "tutorials", "examples")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_no_type_error(tmp_path):
    """On both legs: under TL 4, whose package has no HookedTransformer, mypy reads that name as Any, so the TL 3
    backend's own code is checked on the TL 3 leg and everything else on both."""
    done = _run("mypy", "nla_lens", "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found in ")


def test_the_checkers_fail_on_a_planted_error(tmp_path):
    """Both checks above can fail: each reports a file with one error of its kind."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(x: int) -> str:\n    return x\n", encoding="utf-8")
    assert _run("ruff", "check", "--isolated", str(bad), cwd=tmp_path).returncode == 1  # os imported, unused
    typed = _run("mypy", str(bad), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert typed.returncode == 1 and "Incompatible return value type" in typed.stdout

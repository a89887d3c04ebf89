"""Every tutorial runs top to bottom on the tiny NLA, and its last cell checks a result."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from base_batches import one_thread

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.py"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_there_are_three_tutorials():
    assert [t.name for t in TUTORIALS] == [
        "01_verbalize_tokens.py", "02_steer_then_verbalize.py", "03_patching_study.py"]


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda t: t.stem)
def test_tutorial_runs_and_its_last_cell_asserts(tutorial, tmp_path, monkeypatch, capsys):
    cells = tutorial.read_text().split("# %%")
    assert "assert " in cells[-1] and "if os.environ.get(\"NLA_REAL_CHECKPOINTS\"):" in tutorial.read_text()
    monkeypatch.delenv("NLA_REAL_CHECKPOINTS", raising=False)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tutorial), run_name="__main__")
    assert capsys.readouterr().out.rstrip().endswith("ok")
    assert list(tmp_path.iterdir()) == []  # built its checkpoints in a temp dir, not in the cwd

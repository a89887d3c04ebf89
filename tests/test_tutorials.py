"""Every tutorial runs top to bottom on the tiny NLA and its last cell checks a result; so do the doc snippets."""

from __future__ import annotations

import functools
import runpy
from pathlib import Path

import pytest
import torch
from base_batches import load_base, no_hooks_left

import nla_lens as nl

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.py"))



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


def test_experiments_doc_snippets_run_on_the_tiny_nla(tiny_paths, av_karvonen, ar_nanonla, monkeypatch):
    """README's "Use it in your experiments": every python block but the first (real checkpoints)."""
    # The doc's 150-token default explanations, cut short: the tiny AV only babbles.
    monkeypatch.setattr(av_karvonen, "verbalize", functools.partial(av_karvonen.verbalize, max_new_tokens=8,
                                                                    progress=False))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    doc = readme.split("## Use it in your experiments")[1].split("\n## ")[0]
    blocks = [block.split("```")[0] for block in doc.split("```python\n")[1:]]
    assert "from_pretrained" in blocks[0] and len(blocks) == 5
    base = load_base(tiny_paths["av_karvonen"])
    namespace = {"torch": torch, "nl": nl, "av": av_karvonen, "nla": nl.NLA(av_karvonen, ar_nanonla),
                 "base": base, "K": av_karvonen.meta.layer}
    for block in blocks[1:]:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["cap"].vectors.shape == (2, av_karvonen.meta.d_model)
    assert [r.run for r in namespace["study"].rows] == ["clean", "corrupted", "patched"]
    study = namespace["study"]  # the patched column holds different tokens, so the patch changes the run
    assert namespace["clean"][0, namespace["differs"]] != namespace["corrupted"][0, namespace["differs"]]
    assert (study.patched_vectors - study.corrupted_vectors).abs().max() > 1e-3
    assert no_hooks_left(base) and no_hooks_left(av_karvonen.model)

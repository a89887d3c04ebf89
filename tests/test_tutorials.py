"""Every tutorial notebook runs top to bottom on the bundled toy NLA and its last cell checks a result;
the notebooks are what `tutorials/make_notebooks.py` makes of the percent-format scripts; so do the doc snippets."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from base_batches import load_base, no_hooks_left

import nla_lens as nl

FOLDER = Path(__file__).parents[1] / "tutorials"
TUTORIALS = sorted(FOLDER.glob("[0-9][0-9]_*.py"))
# sae-lens (the `sae` extra) requires transformer-lens < 4: the TL 4.x leg has none.
NEEDS_SAE_LENS = pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None or
                                    int(version("transformer-lens").split(".")[0]) >= 4,
                                    reason="sae-lens 6.x (nla_lens[sae]) needs transformer-lens < 4; not installed")


def _converter():
    spec = importlib.util.spec_from_file_location("make_notebooks", FOLDER / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tutorials_are_the_listed_ones_each_with_its_current_notebook():
    assert [t.name for t in TUTORIALS] == [
        "01_verbalize_tokens.py", "02_steer_then_verbalize.py", "03_patching_study.py", "04_sae_features.py",
        "05_steer_with_words.py"]
    make_notebooks = _converter()
    for script in TUTORIALS:
        shipped = script.with_suffix(".ipynb").read_text(encoding="utf-8")
        assert shipped == make_notebooks.notebook(script), f"run python tutorials/make_notebooks.py ({script.name})"
        cells = json.loads(shipped)["cells"]
        code = "".join("".join(c["source"]) + "\n" for c in cells if c["cell_type"] == "code")
        markdown = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        assert "# %%" not in code and markdown.startswith("# ") and all(c.get("outputs", []) == [] for c in cells)


def test_real_cells_load_the_base_their_nla_names_and_base_text_keeps_its_bos():
    """Pointing a tutorial at other checkpoints changes paths only: the base is the one the sidecar names
    (a hard-coded Qwen3-8B would meet a Gemma NLA), and base text is tokenized as in training, BOS first
    where the tokenizer has one (dropping it costs the Gemma pair FVE 0.77 -> 0.31). Only a single word's
    id (`encode(word, add_special_tokens=False)[0]`) is read without special tokens."""
    for script in TUTORIALS:
        source = script.read_text(encoding="utf-8")
        real = source.split('if os.environ.get("NLA_REAL_CHECKPOINTS"):')[1].split("# %%")[0]
        assert "nl.load_base(nla" in real, script.name
        dropped = [line.strip() for line in source.splitlines() if "prepend_bos=False" in line or
                   ("add_special_tokens=False" in line and ")[0]" not in line)]
        assert dropped == [], script.name



def test_real_cells_pair_the_qwen3_8b_av_release_with_an_ar_you_trained():
    """nanoNLA released a Qwen3-8B AV and no AR: 05 called it "the released Qwen3-8B NLA" and asked for its AR."""
    for script in TUTORIALS:
        markdown = " ".join(line.lstrip("# ") for line in script.read_text(encoding="utf-8").splitlines())
        if "Qwen3-8B" in markdown:
            assert "AR you trained" in markdown and "released Qwen3-8B NLA" not in markdown, script.name

def test_the_tutorials_text_names_only_functions_nla_lens_has():
    """The markdown names `nl.` functions that no cell may call (the real cells are skipped): a rename would leave
    the old name in the text, where running the notebook catches nothing."""
    def exists(name: str) -> bool:
        head, *rest = name.split(".")
        if head in nl._SAE_NAMES:  # imported on first use, which TransformerLens 4.x refuses: the name is enough
            return not rest
        found = getattr(nl, head, None)
        for part in rest:
            found = getattr(found, part, None)
        return found is not None

    for script in TUTORIALS:
        cells = json.loads(script.with_suffix(".ipynb").read_text(encoding="utf-8"))["cells"]
        markdown = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        names = re.findall(r"`(?:[^`]*\W)?nl\.([A-Za-z_][\w.]*[\w])", markdown)
        assert names, script.name
        assert [name for name in names if not exists(name)] == [], script.name


@pytest.mark.parametrize("tutorial", [pytest.param(t, marks=NEEDS_SAE_LENS) if "sae" in t.stem else t
                                      for t in TUTORIALS], ids=lambda t: t.stem)
def test_tutorial_notebook_runs_and_its_last_cell_asserts(tutorial, tmp_path, monkeypatch, capsys):
    cells = [c for c in json.loads(tutorial.with_suffix(".ipynb").read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code"]
    assert "assert " in "".join(cells[-1]["source"])
    assert 'if os.environ.get("NLA_REAL_CHECKPOINTS"):' in tutorial.read_text()
    monkeypatch.delenv("NLA_REAL_CHECKPOINTS", raising=False)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(cells):  # as a kernel runs them: one namespace, cell after cell
        exec(compile("".join(cell["source"]), f"{tutorial.stem}.ipynb[{i}]", "exec"), namespace)
    assert capsys.readouterr().out.rstrip().endswith("ok")
    assert list(tmp_path.iterdir()) == []  # wrote its files in a temp dir, not in the cwd


def _run_with_real_cell(script: Path, av: Path, ar: Path, monkeypatch, tmp_path: Path, **after_real_cell) -> dict:
    """Run `script`'s notebook with its real cell pointed at a tiny pair (on the CPU, its AV folder as the base);
    `after_real_cell` replaces what the real cell set that a tiny pair cannot serve. Returns the namespace."""
    for name, value in (("NLA_REAL_CHECKPOINTS", "1"), ("NLA_AV", str(av)), ("NLA_AR", str(ar))):
        monkeypatch.setenv(name, value)
    from_pretrained = nl.NLA.from_pretrained
    monkeypatch.setattr(nl.NLA, "from_pretrained", lambda av, ar, **device_and_dtype: from_pretrained(av, ar))
    monkeypatch.setattr(nl, "load_base", lambda nla, **device_and_dtype: load_base(av))
    monkeypatch.chdir(tmp_path)
    cells = [c for c in json.loads(script.with_suffix(".ipynb").read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        exec(compile(source, f"{script.stem}.ipynb[{i}]", "exec"), namespace)
        if 'if os.environ.get("NLA_REAL_CHECKPOINTS"):' in source:
            namespace.update(after_real_cell)
    return namespace


@pytest.mark.parametrize("short", [False, True], ids=["its_text", "as_few_tokens_as_a_real_tokenizer_makes"])
def test_tutorial_01_real_cell_runs_on_a_pair_whose_tokenizer_puts_a_bos_first(bos_paths, monkeypatch, tmp_path,
                                                                              capsys, short):
    """01 pointed at a Gemma or Llama pair: a tiny Llama pair stands in for the released checkpoints, and the check
    cell holds: `explain` leaves out the BOS that the text's tokens and `run_with_cache` keep. The real cell's text
    is about 12 tokens to the released pairs' tokenizers, under the 32 a paper baseline needs, and their sidecars
    record none, so its rows have no FVE: the check cell asserted one in every row (AssertionError on every
    released pair). The tiny tokenizer makes 35 tokens of the text; its start stands in for a real tokenizer's few."""
    shorter = {"TEXT": "The Eiffel Tower"} if short else {}
    namespace = _run_with_real_cell(FOLDER / "01_verbalize_tokens.py", bos_paths["llama_av"], bos_paths["llama_ar"],
                                    monkeypatch, tmp_path, **shorter)
    # No baseline in the sidecar: the 3-prompt round trip says so on the result, which the notebook prints
    assert any(w.startswith("no FVE") for w in namespace["rt"].warnings) and "no FVE" in str(namespace["rt"])
    explained = namespace["explained"]
    assert len(explained.rows) < 32 if short else len(explained.rows) >= 32
    assert (explained.round_trip.fve is None) == short
    assert namespace["REAL"] and namespace["base"].cfg.default_prepend_bos
    assert capsys.readouterr().out.rstrip().endswith("ok")


@pytest.mark.filterwarnings("ignore:.*the injection probably failed")  # the tiny AVs babble
@pytest.mark.parametrize("family", ["qwen", "llama"])
@pytest.mark.parametrize(("tutorial", "tiny_stand_ins"), [
    ("02_steer_then_verbalize", {"STEER_LAYER": 1}),  # the real cell's 12: the tiny base has 4 blocks
    # one token apart for the tiny tokenizer, which splits the real cell's names into pieces of other lengths
    ("03_patching_study", {"CLEAN": "the cat sat on the mat", "CORRUPTED": "the dog sat on the mat"}),
])
def test_tutorial_real_cells_run_on_a_tiny_pair_whose_sidecar_records_no_baseline(
        tutorial, tiny_stand_ins, family, tiny_paths, bos_paths, monkeypatch, tmp_path, capsys):
    """02 and 03 pointed at real checkpoints, as 01 is above: the released sidecars record no FVE baseline and these
    read a few vectors, so nothing after the real cell may count on an FVE (01's check cell did). The tiny Qwen and
    Llama pairs stand in (their AVs babble, their readouts fail to parse). 05's real cell cannot run on them:
    `steer_with_words` needs a parsable explanation to edit."""
    av, ar = ((tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]) if family == "qwen"
              else (bos_paths["llama_av"], bos_paths["llama_ar"]))
    namespace = _run_with_real_cell(FOLDER / f"{tutorial}.py", av, ar, monkeypatch, tmp_path, **tiny_stand_ins)
    assert namespace["REAL"] and capsys.readouterr().out.rstrip().endswith("ok")


@NEEDS_SAE_LENS
@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_tutorial_04_real_cell_scans_the_first_token_unless_it_is_a_bos(family, tiny_paths, bos_paths, monkeypatch,
                                                                        tmp_path, capsys):
    """04 pointed at real checkpoints left out the first position of every text (SKIP_FIRST = 1): on Qwen, which puts
    no BOS first, a real token. It now leaves out what the library's scans do: the BOS where the tokenizer puts one
    (the tiny Llama pair), nothing on the tiny Qwen pair; a random SAE of layer K stands in for NLA_SAE."""
    from conftest import D_MODEL, LAYER, make_sae
    from sae_lens import SAE

    from nla_lens.sae import text_residuals

    av, ar = ((tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]) if family == "qwen"
              else (bos_paths["llama_av"], bos_paths["llama_ar"]))
    for name, value in (("NLA_REAL_CHECKPOINTS", "1"), ("NLA_AV", str(av)), ("NLA_AR", str(ar)), ("NLA_SAE", "sae")):
        monkeypatch.setenv(name, value)
    from_pretrained = nl.NLA.from_pretrained
    monkeypatch.setattr(nl.NLA, "from_pretrained", lambda av, ar, **device_and_dtype: from_pretrained(av, ar))
    monkeypatch.setattr(nl, "load_base", lambda nla, **device_and_dtype: load_base(av))
    monkeypatch.setattr(SAE, "load_from_disk", lambda path, device: make_sae(D_MODEL, 16,
                                                                             f"blocks.{LAYER}.hook_resid_post"))
    monkeypatch.chdir(tmp_path)
    script = FOLDER / "04_sae_features.py"
    cells = [c for c in json.loads(script.with_suffix(".ipynb").read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{script.stem}.ipynb[{i}]", "exec"), namespace)
    assert capsys.readouterr().out.rstrip().endswith("ok")
    bos = 1 if family == "llama" else 0
    tokens = [ids for ids, _ in text_residuals(namespace["base"], namespace["texts"], LAYER)]
    assert [ids[0] == namespace["base"].tokenizer.bos_token_id for ids in tokens] == [bool(bos)] * len(tokens)
    scanned = sum(len(ids) - bos for ids in tokens)
    assert len(namespace["token_ids"]) == namespace["stats"].n == namespace["card"].n_positions == scanned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experiments_doc_snippets_run_on_the_tiny_nla(tiny_paths, av_karvonen, ar_nanonla, monkeypatch, dtype):
    """README's "Use it in your experiments": every python block but the first (real checkpoints), with the base in
    float32 and in bfloat16, as the first block loads it. The steering vector was float32 whatever the model's
    dtype: on the bridge its hook handed a bfloat16 model a float32 residual, which HF's next layer refused."""
    # The doc's 150-token default explanations, cut short: the tiny AV only babbles.
    monkeypatch.setattr(av_karvonen, "verbalize", functools.partial(av_karvonen.verbalize, max_new_tokens=8,
                                                                    progress=False))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    doc = readme.split("## Use it in your experiments")[1].split("\n## ")[0]
    blocks = [block.split("```")[0] for block in doc.split("```python\n")[1:]]
    assert "from_pretrained" in blocks[0] and len(blocks) == 5
    base = load_base(tiny_paths["av_karvonen"], dtype)
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

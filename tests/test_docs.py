"""The API reference site: it builds with warnings as errors and documents every public name.

The build needs the `docs` extra (`pip install -e ".[docs]"`); CI installs it in the TL 3.x leg.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import html
import importlib
import inspect
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import nla_lens
from nla_lens.cli import build_parser
from nla_lens.errors import BackendError

ROOT = Path(__file__).parents[1]


def _public_modules() -> list[str]:
    """Every module under nla_lens/ whose dotted name has no `_`-prefixed part."""
    names = set()
    for path in (ROOT / "nla_lens").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(p.startswith("_") for p in parts):
            names.add(".".join(parts))
    return sorted(names)


def _public_names(module_name: str) -> list[str]:
    """`__all__` where a module has one, else the classes and functions it defines without a leading `_`.
    Nothing for a module whose optional dependency is missing here (nla_lens.sae without sae-lens);
    CI builds the docs where it is installed."""
    try:
        module = importlib.import_module(module_name)
    except BackendError:
        return []
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, obj in vars(module).items() if not name.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module_name]


def _inventory(site: Path) -> set[str]:
    """Object names in the site's Sphinx-format inventory (objects.inv: 4 header lines, then zlib)."""
    raw = (site / "objects.inv").read_bytes()
    body = raw.split(b"\n", 4)[4]
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for plugin in ("mkdocs", "mkdocstrings_handlers.python", "mkdocs_gen_files", "material"):
        pytest.importorskip(plugin, reason='the docs extra is not installed: pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def test_every_public_name_is_documented(site):
    documented = _inventory(site)
    expected = {f"nla_lens.{name}" for name in nla_lens.__all__}
    for module in _public_modules():
        expected |= {module} | {f"{module}.{name}" for name in _public_names(module)}
    missing = sorted(expected - documented)
    assert not missing, f"public names missing from the API reference: {missing}"
    assert len(expected) > len(nla_lens.__all__) + 100  # the walk found the modules' names too


def test_every_name_of_the_api_index_has_a_docstring_of_its_own():
    """The index's summary column is each name's first docstring paragraph; a dataclass without a docstring
    gets the one `dataclasses` writes, its signature ("SteeringResult(rows: 'list[SteeringRow]', ...")."""
    undocumented = []
    for name in nla_lens.__all__:
        doc = getattr(nla_lens, name).__doc__
        if not doc or doc.startswith(f"{name}("):
            undocumented.append(name)
    assert undocumented == []


def test_docstrings_link_as_mkdocstrings_does_not_as_sphinx():
    """mkdocstrings prints a Sphinx role as it stands (":class:NLAMeta" on the page); a link is written
    [`NLAMeta`][nla_lens.sidecar.NLAMeta] and the strict build fails if it leads nowhere. Checked in every
    module of the package, since the site has a page for each."""
    paths = sorted((ROOT / "nla_lens").rglob("*.py"))
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{path.relative_to(ROOT)}: {role}" for role in re.findall(
                    r":(?:class|func|mod|meth|attr|exc):`[^`]*`", ast.get_docstring(node) or "")]
    assert len(paths) >= 40 and found == []


def _attributes_section(cls: type) -> dict[str, str]:
    """The entries of a class docstring's Google-style `Attributes:` section, name -> description."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    entries: dict[str, str] = {}
    for line in lines[lines.index("Attributes:") + 1:]:
        if line and not line[0].isspace():
            break
        entry = re.match(r"    (\w+): (.*)", line)
        if entry:
            entries[entry[1]] = entry[2].strip()
    return entries


def _result_types() -> list[type]:
    """Every dataclass result type (a `TabularResult` of any public module) and the row types they hold."""
    from nla_lens.capture import CapturedRow
    from nla_lens.experiments import PatchingRow, SteeringRow
    from nla_lens.explain import ExplainedToken
    from nla_lens.nla import Baseline
    from nla_lens.results import TabularResult
    from nla_lens.toy.steer_words_experiment import AlphaRow
    from nla_lens.verbalizer import Verbalization

    rows: list[type] = [Baseline, CapturedRow, ExplainedToken, PatchingRow, SteeringRow, Verbalization, AlphaRow]
    try:
        from nla_lens.feature_cards import FeatureContext
        from nla_lens.sae import ResidualStats
        from nla_lens.toy.sae_experiment import FeatureRow
        rows += [FeatureContext, ResidualStats, FeatureRow]
    except BackendError:  # sae-lens is not installed here (TransformerLens 4)
        pass
    for module in _public_modules():  # imported, so that their result types are subclasses below
        try:
            importlib.import_module(module)
        except (BackendError, ImportError):  # a backend this TransformerLens lacks: nothing of it is a result type
            pass
    found, todo = set(), [TabularResult]
    while todo:
        subclasses = set(todo.pop().__subclasses__()) - found
        found |= subclasses
        todo += subclasses
    tables = {cls for cls in found if cls.__module__.startswith("nla_lens.") and dataclasses.is_dataclass(cls)}
    return sorted(tables | set(rows), key=lambda cls: cls.__qualname__)


def test_every_field_of_a_result_type_is_described_in_its_docstring():
    """`help(SteeringResult)` and a notebook's `?` show the class docstring: each field's meaning is written once,
    in its `Attributes:` section (the fields carried trailing comments, which only the API site showed). A new
    field without an entry, or an entry for a field that is gone, fails here."""
    types = _result_types()
    assert {"RoundTrip", "SteeringResult", "PatchingStudy", "Explanation", "WordSteering", "Verbalization"} <= {
        cls.__name__ for cls in types}
    wrong = {}
    for cls in types:
        fields = [f.name for f in dataclasses.fields(cls)]
        described = _attributes_section(cls)
        if list(described) != fields or not all(described.values()):
            wrong[cls.__qualname__] = (fields, list(described))
    assert wrong == {}


def test_field_docs_are_on_the_reference_pages_once(site):
    """A result type's `Attributes:` entry shows under its field's own heading, and nowhere else on the page
    (docs/griffe_field_docs.py moves it there from the class docstring, which mkdocstrings would render as a
    table above the fields listed again, bare); a field of another dataclass still shows its trailing comment."""
    from nla_lens.nla import RoundTrip

    described = _attributes_section(RoundTrip)["reconstructions"]
    page = html.unescape((site / "reference" / "nla_lens.nla" / "index.html").read_text(encoding="utf-8"))
    field = page[page.index('id="nla_lens.nla.RoundTrip.reconstructions"'):]
    assert len(described) > 10 and described in field[:field.index('id="nla_lens.nla.RoundTrip.mse"')]
    assert page.count(described) == 1

    source = (ROOT / "nla_lens" / "toy" / "sae_experiment.py").read_text(encoding="utf-8").splitlines()
    line = next(text for text in source if text.strip().startswith("context_size: "))
    comment = line.split("#", 1)[1].strip()
    page = (site / "reference" / "nla_lens.toy.sae_experiment" / "index.html").read_text(encoding="utf-8")
    config = 'id="nla_lens.toy.sae_experiment.SAEExperimentConfig.'
    field = page[page.index(f'{config}context_size"'):]
    assert len(comment) > 10 and comment in field[:field.index(config, 1)]


def test_every_subcommand_is_on_the_command_line_page(site):
    page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert len(commands) >= 9
    for name, sub in commands.items():
        assert f"nla-lens {name}" in page
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, f"nla-lens {name} {flag} is not on the command line page"


def test_every_cli_default_is_stated_in_its_help():
    """The command line page is the flags' `--help`: a default it does not state (demo's --max-new-tokens 48,
    every --batch-size and --device) was nowhere in the reference."""
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    unstated = [f"{name} {action.option_strings[0]}" for name, sub in subcommands.items() for action in sub._actions
                if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in (action.help or "")]
    assert unstated == []


def test_cited_docs_pages_exist():
    """Every docs/*.md path that the README, pyproject.toml or mkdocs.yml names is a file."""
    cited = set()
    for source in ("README.md", "pyproject.toml", "mkdocs.yml"):
        cited |= set(re.findall(r"docs/[\w./-]+\.md", (ROOT / source).read_text(encoding="utf-8")))
    assert "docs/backends.md" in cited
    assert [path for path in sorted(cited) if not (ROOT / path).is_file()] == []


def _anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings, as GitHub and the site's toc slug them (lower case, punctuation
    dropped, spaces as hyphens)."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"),
                                                flags=re.DOTALL | re.MULTILINE), flags=re.MULTILINE)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower())) for heading in headings}


def test_readme_links_name_headings_that_exist():
    """The README's sections end with `Details: [docs/guide/<page>.md](docs/guide/<page>.md#anchor)`: each link's page
    has that heading, and each of the README's own `(#anchor)` links names one of its headings. (Links between the
    site's pages are checked by `mkdocs build --strict`, `validation.anchors`.)"""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs/[\w./-]+\.md)?)(?:#([\w-]+))?\)", readme)
    guide_links = [(path, anchor) for path, anchor in links if path.startswith("docs/guide/")]
    assert len(guide_links) >= 10 and all(anchor for _, anchor in guide_links)
    broken = [f"{path or 'README.md'}#{anchor}" for path, anchor in links
              if anchor and anchor not in _anchors(ROOT / (path or "README.md"))]
    assert broken == []


def test_every_guide_page_is_in_the_site_nav_and_the_docs_index():
    """A guide page the site's nav leaves out fails the strict build (omitted file); one docs/index.md leaves out
    is found by no reader of the site's home page."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    pages = [path.relative_to(ROOT / "docs").as_posix() for path in sorted((ROOT / "docs" / "guide").glob("*.md"))]
    assert len(pages) >= 6
    assert [page for page in pages if f": {page}\n" not in nav or f"]({page})" not in index] == []


def test_readme_extras_table_lists_every_extra():
    """The README's install table named four of pyproject's five extras (not `docs`, which its API reference
    section then asks for)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [name for name in extras if f"\n| `{name}` | " not in readme] == []


def test_readme_explain_block_names_every_column_of_the_table():
    """The comment on `explained.to_pandas()` named 7 of the table's 13 columns, leaving out `miss`, `truncated`,
    `text_index`, ..."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Explain a text in one call")[1].split("```python\n")[1].split("```")[0]
    comment = block.split("explained.to_pandas()")[1].split("\nexplained.save(")[0]
    named = re.sub(r"\s*#\s*", " ", comment).split("one row per token:")[1]
    assert [name.strip() for name in named.split(",")] == nla_lens.Explanation.schema.names

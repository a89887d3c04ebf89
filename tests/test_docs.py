"""The API reference site: it builds with warnings as errors and documents every public name.

The build needs the `docs` extra (`pip install -e ".[docs]"`); CI installs it in the TL 3.x leg.
"""

from __future__ import annotations

import argparse
import ast
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


def test_field_comments_are_on_the_reference_pages(site):
    """A dataclass field is documented by its trailing comment (`reconstructions: ...  # NaN rows where ...`);
    griffe reads docstrings only, so the result types' pages showed every field bare until
    docs/griffe_field_comments.py gave each one-line field its comment."""
    source = (ROOT / "nla_lens" / "nla.py").read_text(encoding="utf-8").splitlines()
    line = next(text for text in source if text.strip().startswith("reconstructions: "))
    comment = line.split("#", 1)[1].strip()
    page = (site / "reference" / "nla_lens.nla" / "index.html").read_text(encoding="utf-8")
    field = page[page.index('id="nla_lens.nla.RoundTrip.reconstructions"'):]
    assert len(comment) > 10 and comment in field[:field.index('id="nla_lens.nla.RoundTrip.mse"')]


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


def test_readme_extras_table_lists_every_extra():
    """The README's install table named four of pyproject's five extras (not `docs`, which its API reference
    section then asks for)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [name for name in extras if f"\n| `{name}` | " not in readme] == []

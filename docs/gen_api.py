"""Write the API reference pages during `mkdocs build` (mkdocs-gen-files), from the package itself.

One page per public module (every module under nla_lens/ with no `_`-prefixed part), an index of
`nla_lens.__all__` linking each name to where it is documented, and the `--help` of every `nla-lens`
subcommand. A name added to `__all__`, a new module or a new subcommand appears with no edit here;
tests/test_docs.py checks the built site against the package.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import mkdocs_gen_files

import nla_lens
from nla_lens.cli import build_parser

PACKAGE = Path(nla_lens.__file__).parent


def public_modules() -> list[str]:
    """Dotted names of the package's modules, namespace folders (no __init__.py) included; the package
    itself is the index page."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1 and not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return names


def documented_at(name: str) -> str:
    """The dotted path under which `nla_lens.<name>` is documented: where it is defined."""
    obj = getattr(nla_lens, name)
    if inspect.ismodule(obj):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else f"nla_lens.{name}"


def summary(name: str) -> str:
    doc = inspect.getdoc(getattr(nla_lens, name)) or ""
    return doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")


def index_page(modules: list[str]) -> str:
    rows = [f"| [`{name}`][{documented_at(name)}] | {summary(name)} |" for name in sorted(nla_lens.__all__)]
    links = [f"- [`{module}`]({module}.md)" for module in modules]
    return "\n".join([
        "# API reference", "",
        "::: nla_lens", "    options:", "      members: false", "      heading_level: 2", "",
        "`import nla_lens as nl` gives these names (`nla_lens.__all__`); each links to its documentation in the "
        "module that defines it.", "",
        "| name | summary |", "|---|---|", *rows, "",
        "## Modules", "",
        "Everything else lives in these modules; `nla_lens.__all__` is the stable surface.", "",
        *links, "",
    ])


def cli_page() -> str:
    parser = build_parser()
    sections = ["# Command line", "", "`nla-lens SUBCOMMAND --help` prints each of these.", "",
                "```text", parser.format_help().rstrip(), "```", ""]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        sections += [f"## `nla-lens {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(sections)


def main() -> None:
    modules = public_modules()
    for module in modules:  # read statically by griffe: optional extras (sae-lens) need not be installed
        with mkdocs_gen_files.open(f"reference/{module}.md", "w") as page:
            page.write(f"::: {module}\n")  # the module's own heading is the page title
    with mkdocs_gen_files.open("reference/index.md", "w") as page:
        page.write(index_page(modules))
    with mkdocs_gen_files.open("reference/cli.md", "w") as page:
        page.write(cli_page())
    api_section = next(entry["API reference"] for entry in mkdocs_gen_files.config["nav"] if "API reference" in entry)
    api_section += [f"reference/{module}.md" for module in modules]  # mkdocs.yml's nav names the fixed pages only


main()

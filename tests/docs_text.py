"""The README and the guide pages it links to, read as the tests that pin a documented claim read them.

The README is the entry point; the edge cases, measurements and narratives of each topic live in
docs/guide/<topic>.md (and the bridge's differences in docs/backends.md). A claim a test pins may sit in any of them.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide"


def guide_pages() -> list[Path]:
    """docs/guide/*.md, then docs/backends.md (the TransformerLens page, which the README section feeds)."""
    return sorted(GUIDE.glob("*.md")) + [ROOT / "docs" / "backends.md"]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def guide(name: str) -> str:
    """One guide page's text, by its name without `.md` (`"steer-words"`)."""
    return read(GUIDE / f"{name}.md")


def readme_and_guides() -> str:
    """The README, then every guide page, as one text: where a test looks for a claim wherever it now lives."""
    return "\n\n".join(read(path) for path in [README, *guide_pages()])

"""Check a built sdist and wheel: every committed file users or packagers need, no dev-tree debris, and
the metadata an index shows. Run from the repository root by .ci/wheel_check.sh (needs git and
trove-classifiers).

    python .ci/dist_contents.py dist/nla_lens-X.tar.gz dist/nla_lens-X-py3-none-any.whl
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

from trove_classifiers import classifiers as known_classifiers

LICENSE_FILES = {"LICENSE", "NOTICE"}
SDIST_TOP_FILES = {"pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in", "mkdocs.yml"} | LICENSE_FILES
DEBRIS_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".git", "build", "dist", ".whl"}
EXTRAS = {"tl3", "tl4", "test", "sae", "docs"}


def committed(*folders: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--", *folders], capture_output=True, text=True, check=True).stdout
    return {path for path in out.split("\0") if path}


def debris(paths: set[str]) -> list[str]:
    """Paths that belong to a developer's tree, not a distribution: venvs, caches, build output, bytecode."""
    return sorted(p for p in paths
                  if p.endswith((".pyc", ".pyo")) or any(part in DEBRIS_DIRS or part.startswith(".venv")
                                                         for part in p.split("/")[:-1]))


def expect(ok: bool, what: str, paths: list[str] | set[str] = ()) -> None:
    if not ok:
        shown = "\n    ".join(sorted(paths)[:20])
        sys.exit(f"dist check failed: {what}" + (f":\n    {shown}" if shown else ""))


def check_sdist(sdist: Path, version: str) -> None:
    root = f"nla_lens-{version}/"
    with tarfile.open(sdist) as archive:
        files = {m.name.removeprefix(root) for m in archive.getmembers() if m.isfile()}
    missing = (committed("nla_lens", "tests", "tutorials", "examples", "docs") | SDIST_TOP_FILES) - files
    expect(not missing, f"{sdist.name} lacks committed files", missing)
    expect(not debris(files), f"{sdist.name} holds dev-tree debris", debris(files))
    print(f"sdist ok: {sdist.name}, {len(files)} files, {sdist.stat().st_size / 2**20:.1f} MiB")


def check_wheel(wheel: Path, version: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        dist_info = f"nla_lens-{version}.dist-info/"
        metadata = Parser().parsestr(archive.read(dist_info + "METADATA").decode())
        entry_points = archive.read(dist_info + "entry_points.txt").decode()
    package = {f for f in files if f.startswith("nla_lens/")}
    stray = {f for f in files if not f.startswith(("nla_lens/", dist_info))}
    expect(not stray, f"{wheel.name} installs files outside nla_lens/", stray)
    expected = committed("nla_lens")
    expect(package == expected, f"{wheel.name}'s nla_lens/ differs from the committed package (missing, extra)",
           (expected - package) | (package - expected))
    expect("nla_lens/py.typed" in package, "py.typed is missing from the wheel")
    toy = {f for f in package if f.startswith("nla_lens/toy/checkpoints/")}
    for role in ("base", "av", "ar"):
        expect(f"nla_lens/toy/checkpoints/{role}/model.safetensors" in toy, f"the toy {role} weights are missing")
    licenses = {f.removeprefix(dist_info + "licenses/") for f in files if f.startswith(dist_info + "licenses/")}
    expect(licenses == LICENSE_FILES, f"dist-info/licenses holds {sorted(licenses)}, not {sorted(LICENSE_FILES)}")

    expect(metadata["Version"] == version, f"METADATA version {metadata['Version']} != {version}")
    expect(metadata["License-Expression"] == "MIT", f"License-Expression is {metadata['License-Expression']!r}")
    expect(set(metadata.get_all("License-File") or ()) == LICENSE_FILES, "License-File entries differ")
    expect(bool(metadata["Requires-Python"]), "Requires-Python is missing")
    extras = set(metadata.get_all("Provides-Extra") or ())
    expect(EXTRAS <= extras, f"extras {sorted(EXTRAS - extras)} are missing")
    unknown = set(metadata.get_all("Classifier") or ()) - known_classifiers
    expect(not unknown, "classifiers PyPI would refuse", unknown)
    expect(re.search(r"^nla-lens = nla_lens\.cli:main$", entry_points, re.MULTILINE) is not None,
           "the nla-lens console script is missing")
    print(f"wheel ok: {wheel.name}, {len(package)} package files ({len(toy)} toy checkpoint files, py.typed), "
          f"{wheel.stat().st_size / 2**20:.1f} MiB, licences {sorted(licenses)}, extras {sorted(extras)}")


def main() -> None:
    sdist, wheel = (Path(arg) for arg in sys.argv[1:3])
    version = wheel.name.split("-")[1]
    init = Path("nla_lens/__init__.py").read_text()
    expect(f'__version__ = "{version}"' in init, f"the wheel's version {version} is not nla_lens.__version__")
    check_sdist(sdist, version)
    check_wheel(wheel, version)


if __name__ == "__main__":
    main()

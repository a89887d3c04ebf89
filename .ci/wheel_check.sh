#!/usr/bin/env bash
# The package as users get it. Build the sdist and, from it, the wheel (`python -m build`); check both
# (twine; .ci/dist_contents.py: committed files present, no dev-tree debris, metadata); install the wheel
# with the tl3 extra into a fresh venv and, from a folder outside the clone, run `nla-lens demo` and an
# import + verbalize smoke test (.ci/wheel_smoke.py). Measured: 2.5 CPU-minutes, most of it installing torch
# and the dependencies (pip's cache is left on, so what the test venvs fetched is reused).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

python3 -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet build twine trove-classifiers
"$work/tools/bin/python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(echo "$work"/dist/*.tar.gz)
wheel=$(echo "$work"/dist/*.whl)
"$work/tools/bin/python" -m twine check --strict "$sdist" "$wheel"
"$work/tools/bin/python" .ci/dist_contents.py "$sdist" "$wheel"
echo "== built and checked the sdist and wheel (${SECONDS}s)"

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0  # the CPU wheel on disk; never an unpinned torch
"$work/venv/bin/python" -m pip install --quiet "$wheel[tl3]"
cp .ci/wheel_smoke.py "$work/"
cd "$work"  # off the clone; `python -I` keeps the script's folder and PYTHON* variables out of sys.path too
"$work/venv/bin/nla-lens" --version
"$work/venv/bin/nla-lens" demo >demo.txt
tail -n 1 demo.txt
"$work/venv/bin/python" -I wheel_smoke.py "$repo" demo.txt
echo "== the installed wheel works (${SECONDS}s in all)"

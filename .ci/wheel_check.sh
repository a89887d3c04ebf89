#!/usr/bin/env bash
# The package as users get it. Build the sdist and, from it, the wheel (`python -m build`); check both
# (twine; .ci/dist_contents.py: committed files present, no dev-tree debris, metadata); install the wheel
# into a fresh venv twice, with the tl3 extra and as `pip install nla-lens` does (no extra: the newest
# TransformerLens allowed, 4.x), and from a folder outside the clone run `nla-lens demo` and an import +
# verbalize smoke test (.ci/wheel_smoke.py) that checks the backend each install gives. Measured: 2.5
# CPU-minutes with the tl3 install alone; with both, 2.9 CPU-minutes and 6.4 minutes of wall time on 2026-12-05
# (2 cores shared with other work), most of it installing torch and the dependencies (pip's cache is left on, so
# what the test venvs fetched is reused).
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

cp .ci/wheel_smoke.py "$work/"

# check_install NAME EXTRA BACKEND: the wheel with EXTRA in a fresh venv gives BACKEND, and its demo and smoke pass.
check_install() {
    local venv="$work/venv-$1"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet torch==2.13.0  # the CPU wheel on disk; never an unpinned torch
    "$venv/bin/python" -m pip install --quiet "$wheel$2"
    # off the clone; `python -I` keeps the script's folder and PYTHON* variables out of sys.path too
    (
        cd "$work"
        "$venv/bin/nla-lens" --version
        "$venv/bin/nla-lens" demo >"demo-$1.txt"
        tail -n 1 "demo-$1.txt"
        "$venv/bin/python" -I wheel_smoke.py "$repo" "demo-$1.txt" "$3"
    )
    echo "== the installed wheel works, $1 install (${SECONDS}s in all)"
}

check_install tl3 "[tl3]" hooked  # pip install "nla-lens[tl3]": HookedTransformer
check_install default "" bridge   # pip install nla-lens: the newest TransformerLens allowed, TransformerBridge

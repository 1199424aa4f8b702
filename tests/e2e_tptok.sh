#!/usr/bin/env bash
# tptok encode/decode on the repo's Qwen3 tokenizer.  The expected ids are
# copied from tests/data/tokenizer-fixtures/qwen3.json (Hugging Face
# tokenizers' output, written by tools/make_tokenizer_fixtures.py); outputs
# are compared byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
TOK=tests/data/qwen3-tokenizer/tokenizer.json.zst
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0

# text (printf %b escapes), ids as tptok prints them
check() {
    printf '%b' "$1" >"$tmp/text"
    printf '%s\n' "$2" >"$tmp/want_ids"
    if ! "$BIN/tptok" encode "$TOK" <"$tmp/text" >"$tmp/ids"; then
        echo "FAIL: encode exited non-zero for: $1"; fails=$((fails+1)); return
    fi
    if ! cmp -s "$tmp/ids" "$tmp/want_ids"; then
        echo "FAIL: encode $1"; echo "  got:  $(cat "$tmp/ids")"; echo "  want: $2"; fails=$((fails+1))
    fi
    if ! "$BIN/tptok" decode "$TOK" <"$tmp/want_ids" >"$tmp/back" || ! cmp -s "$tmp/back" "$tmp/text"; then
        echo "FAIL: decode of $2 does not give back the text"; fails=$((fails+1))
    fi
}

check 'Hello, world!' '[9707, 11, 1879, 0]'
check '<|im_start|>user\nhi<|im_end|>' '[151644, 872, 198, 6023, 151645]'
check 'def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n' \
      '[750, 15801, 1445, 982, 262, 421, 308, 366, 220, 17, 510, 286, 470, 308, 198, 262, 470, 15801, 1445, 481, 220, 16, 8, 488, 15801, 1445, 481, 220, 17, 340]'
check 'Family: \xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7\xe2\x80\x8d\xf0\x9f\x91\xa6 and \xf0\x9f\x91\xa9\xf0\x9f\x8f\xbd\xe2\x80\x8d\xf0\x9f\x92\xbb coder' \
      '[15192, 25, 61804, 101, 378, 235, 145233, 378, 235, 145665, 378, 235, 145988, 323, 61804, 102, 145375, 378, 235, 145851, 83542]'
check '' '[]'

# NFD input is normalised: decode gives the NFC text.
printf 'caf\x65\xcc\x81' | "$BIN/tptok" encode "$TOK" >"$tmp/ids"
printf '%s' "$(cat "$tmp/ids")" | "$BIN/tptok" decode "$TOK" >"$tmp/back"
printf 'caf\xc3\xa9' | cmp -s - "$tmp/back" || { echo "FAIL: NFD input did not decode to NFC"; fails=$((fails+1)); }

# --skip-special drops special tokens.
printf '[151644, 872, 198, 6023, 151645]' | "$BIN/tptok" decode --skip-special "$TOK" >"$tmp/back"
printf 'user\nhi' | cmp -s - "$tmp/back" || { echo "FAIL: --skip-special"; fails=$((fails+1)); }

# Errors: non-zero exit and a "tptok: " message naming the problem.
expect_error() { # description, needle, command...
    local what=$1 needle=$2; shift 2
    if "$@" >"$tmp/out" 2>"$tmp/err"; then
        echo "FAIL: $what: exit status 0"; fails=$((fails+1)); return
    fi
    if ! grep -q '^tptok: ' "$tmp/err" || ! grep -qF -- "$needle" "$tmp/err"; then
        echo "FAIL: $what: stderr lacks '$needle': $(cat "$tmp/err")"; fails=$((fails+1))
    fi
}
echo '[9707, 151669]' >"$tmp/bad_id"
expect_error "unknown id" "151669" "$BIN/tptok" decode "$TOK" <"$tmp/bad_id"
echo '[9707, "x"]' >"$tmp/bad_elem"
expect_error "non-integer id" "element 1" "$BIN/tptok" decode "$TOK" <"$tmp/bad_elem"
echo '{"ids": [1]}' >"$tmp/bad_json"
expect_error "not an array" "JSON array" "$BIN/tptok" decode "$TOK" <"$tmp/bad_json"
expect_error "missing tokenizer" "$tmp/nope.json" "$BIN/tptok" encode "$tmp/nope.json" </dev/null
printf 'ab\xff' >"$tmp/bad_utf8"
expect_error "invalid UTF-8" "UTF-8" "$BIN/tptok" encode "$TOK" <"$tmp/bad_utf8"
echo '{"model": {"type": "Unigram"}}' >"$tmp/unigram.json"
expect_error "unsupported model" "model.type" "$BIN/tptok" encode "$tmp/unigram.json" </dev/null
if "$BIN/tptok" frobnicate "$TOK" </dev/null >/dev/null 2>&1; then
    echo "FAIL: unknown command exited 0"; fails=$((fails+1))
fi

if [ "$fails" -ne 0 ]; then echo "$fails failure(s)"; exit 1; fi
echo "e2e_tptok: all checks passed"

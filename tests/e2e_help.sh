#!/usr/bin/env bash
# e2e_help.sh - every program in $BIN answers --help and -h on stdout with
# exit 0, shows at least one example, and names every flag its parser
# accepts.  The flags are read out of the program's source (tools/NAME.c):
# every "-x" / "--xyz" string literal compared with strcmp, so a flag added
# to a parser without a line in its help fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
fails=0
checked=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for src in tools/*.c; do
    prog=$(basename "$src" .c)
    exe=$BIN/$prog
    [ -x "$exe" ] || { fail "$prog: $exe is not built"; continue; }
    for h in --help -h; do
        rc=0
        "$exe" "$h" >"$tmp/out" 2>"$tmp/err" </dev/null || rc=$?
        [ $rc -eq 0 ] || fail "$prog $h exited $rc: $(head -c 200 "$tmp/err")"
        [ -s "$tmp/out" ] || fail "$prog $h printed nothing on stdout"
    done
    "$exe" --help >"$tmp/help" 2>/dev/null || true
    # an "Examples:" section with at least one command line of the program
    awk -v prog="$prog" '/^Examples?:/ {f = 1; next} f && index($0, prog " ") {found = 1} END {exit !found}' \
        "$tmp/help" || fail "$prog --help shows no example (an Examples: section)"
    # flags: "-x"/"--xyz" literals compared with strcmp, and getopt_long's
    # {"xyz", ..._argument, ...} entries
    flags=$( { grep -oE 'strcmp\([^,()]+, *"--?[a-zA-Z][-a-zA-Z0-9]*"\)' "$src" | grep -oE '"-[^"]+"' | tr -d '"' || true
               grep -oE '\{"[a-z][-a-z0-9]*", *(no|required|optional)_argument' "$src" | sed -E 's/^\{"([^"]+)".*/--\1/' || true
             } | sort -u)
    [ -n "$flags" ] || fail "$prog: no flags found in $src (the grep is out of date?)"
    for f in $flags; do
        grep -qE -- "(^|[^-a-zA-Z0-9])$f([^-a-zA-Z0-9]|$)" "$tmp/help" || fail "$prog --help does not mention $f"
        checked=$((checked + 1))
    done
done
echo "e2e_help: $checked flags of $(ls tools/*.c | wc -l) programs checked, $fails failures"
[ $fails -eq 0 ]

#!/usr/bin/env bash
# Installs the Debian packages tpshard builds and tests with, when missing.
# Safe to run again: it does nothing when everything is there.
# The CUDA toolkit and NCCL are not installed here; they are used from
# /usr/local/cuda when present (make builds a CPU-only tprun otherwise).
set -eu
pkgs=(build-essential pkg-config clang libclang-rt-14-dev zstd
      libzstd-dev libcjson-dev libarchive-dev libxxhash-dev libpcre2-dev
      libutf8proc-dev libopenblas-dev libopenmpi-dev openmpi-bin time
      libmicrohttpd-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "install-deps: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env python3
"""rewrite.py KERNELS.cu - prints the CUDA source rewritten for the host
emulation (run_emu.sh): kernel launches `k<<<grid, block, smem, s>>>(args);`
become emu_launch(s, ...) calls (the arguments captured by value, so that a
recorded launch can replay) and the dynamic shared-memory array comes from
emu_smem().  Optional developer check, not part of the build or the tests."""
import re
import sys


def split_top(cfg):
    parts, depth, cur = [], 0, ""
    for ch in cfg:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def launch(m):
    name, cfg, args = m.group(1), m.group(2), m.group(3)
    parts = split_top(cfg)
    while len(parts) < 3:
        parts.append("0")
    stream = parts[3] if len(parts) > 3 else "nullptr"
    # [=]: the launch may be recorded by a stream capture and run at a graph
    # replay, after the launcher's locals are gone: capture them by value.
    return (f"emu_launch({stream}, dim3({parts[0]}), dim3({parts[1]}), {parts[2]}, "
            f"[=]{{ {name}({args}); }});")


src = open(sys.argv[1]).read()
src = src.replace("extern __shared__ float smem[];", "float *smem = emu_smem();")
out, n = re.subn(r"(\w+)<<<(.*?)>>>\((.*?)\);", launch, src, flags=re.S)
if n == 0 or "<<<" in out:
    sys.exit(f"rewrite.py: {sys.argv[1]}: kernel launches not rewritten")
sys.stdout.write(out)

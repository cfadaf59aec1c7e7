#!/usr/bin/env python3
"""Which code a running server keeps resident: the binary's text pages that are mapped
(/proc/PID/pagemap), each attributed to the crate or library owning most symbols in it
(`nm`). The kernel maps up to 64 KiB around each page touched, so this shows where the
start-up's code pages come from (docs/performance.md, idle RSS).

    scripts/text-pages.py PID [BINARY]

Needs read access to /proc/PID/pagemap (the same user, or root)."""

import bisect
import collections
import re
import struct
import subprocess
import sys

PAGE = 4096


def main():
    pid = sys.argv[1]
    binary = sys.argv[2] if len(sys.argv) > 2 else None
    maps = open(f"/proc/{pid}/maps").read().splitlines()
    text = [line for line in maps if " r-xp " in line and (binary or "/") in line]
    if binary is None:
        exe = subprocess.run(["readlink", f"/proc/{pid}/exe"], capture_output=True, text=True)
        binary = exe.stdout.strip()
        text = [line for line in text if line.endswith(binary)]
    if not text:
        sys.exit("no executable mapping of the binary found")
    span, _, offset = text[0].split()[:3]
    start, end = (int(x, 16) for x in span.split("-"))
    offset = int(offset, 16)
    # The text segment's virtual address minus its file offset (PIE: usually a page).
    segment = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout
    load = [line.split() for line in segment.splitlines() if line.strip().startswith("LOAD") and "E" in line.split()[-2:-1][0]]
    delta = int(load[0][2], 16) - int(load[0][1], 16) if load else 0
    vstart = offset + (delta // PAGE) * PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(start // PAGE * 8)
        count = (end - start) // PAGE
        entries = pagemap.read(count * 8)
    present = [i for i in range(count) if struct.unpack_from("<Q", entries, i * 8)[0] >> 63]
    print(f"text: {count * PAGE / 2**20:.1f} MiB, resident: {len(present) * PAGE / 2**20:.1f} MiB")
    symbols = []
    nm = subprocess.run(["nm", "-n", "-C", "--defined-only", binary], capture_output=True, text=True)
    for line in nm.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in ("t", "T", "w", "W"):
            symbols.append((int(parts[0], 16), parts[2]))
    addresses = [a for a, _ in symbols]
    owners = collections.Counter()
    for i in present:
        page = vstart + i * PAGE
        k = max(bisect.bisect_right(addresses, page) - 1, 0)
        names = collections.Counter()
        while k < len(symbols) and symbols[k][0] < page + PAGE:
            names[owner(symbols[k][1])] += 1
            k += 1
        owners[names.most_common(1)[0][0] if names else "?"] += 1
    for name, pages in owners.most_common(25):
        print(f"{pages * PAGE / 2**20:7.2f} MiB  {name}")


def owner(symbol):
    """The leading path segment of a demangled symbol: a crate, or `rocksdb`."""
    symbol = symbol.lstrip("<&*( ")
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", symbol)
    return match.group(0) if match else symbol[:20]


if __name__ == "__main__":
    main()

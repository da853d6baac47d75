"""List the kernels Triton compiled into a cache directory, oldest first, with the seconds
since a start time: shows which kernels a run compiled and when (e.g. after the daemon's
warm-up, inside the first session).   usage: python scripts/triton_compiles.py DIR [START_EPOCH]"""

import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1])
    start = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    rows = []
    for meta in root.glob("*/*.json"):
        if meta.name.startswith("__grp__"):
            continue
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        rows.append((meta.stat().st_mtime - start, data.get("name", meta.stem), data.get("num_warps"), meta.parent.name[:10]))
    rows.sort()
    for t, name, warps, key in rows:
        print(f"{t:9.1f}s  {name:48s} warps={warps} {key}")
    print(f"{len(rows)} kernels")


if __name__ == "__main__":
    main()

"""Run every benchmark in bench/ in turn: ``python -m bench.run_all [NAME-FILTER ...]``.

Each ``bench/bench_*.py`` is a script of its own that prints its figures; this driver
runs them one after another with the same Python (never two at once: they measure
timings on a shared machine), and exits non-zero if any of them failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main(argv: list[str]) -> int:
    filters = [a for a in argv if a]
    scripts = sorted(HERE.glob("bench_*.py"))
    if filters:
        scripts = [s for s in scripts if any(f in s.name for f in filters)]
    if not scripts:
        what = f" matching {' '.join(filters)}" if filters else ""
        print(f"no benchmark{what} in {HERE.relative_to(ROOT)}/ (bench_*.py)")
        return 0

    results: list[tuple[str, int, float]] = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        start = time.monotonic()
        try:
            argv = [sys.executable, "-m", f"bench.{script.stem}"]
            code = subprocess.run(argv, cwd=ROOT, check=False).returncode
        except KeyboardInterrupt:
            print(f"\ninterrupted during {script.name}")
            return 130
        results.append((script.name, code, time.monotonic() - start))

    print("\n=== summary ===")
    for name, code, took in results:
        print(f"{'ok    ' if code == 0 else 'FAILED'} {name} ({took:.0f} s)")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

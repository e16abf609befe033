"""Run the benchmarks in bench/ in turn, and write what each printed into the docs.

    python -m bench.run_all [--write] [--page NAME] [--note TEXT] [NAME-FILTER ...]
                            [-- BENCH-ARGS ...]

Each ``bench/bench_*.py`` is a script of its own that prints its figures; this driver
runs them one after another with the same Python (never two at once: they measure
timings on a shared machine), shows what they print as they print it, and exits
non-zero if any of them failed. Arguments after ``--`` go to every benchmark run
(``--runs 3``).

With ``--write``, a benchmark that succeeded has its printed figures written into its
results page, ``docs/benchmarks/NAME.md`` (``bench_failover.py``: ``failover.md``), with
the date, the commit, the machine (CPU, cores, memory, kernel, Python, etcd and
PostgreSQL versions, load average) and the command. A benchmark that failed or was
interrupted writes nothing: its page keeps the last good result. ``--page NAME`` writes
the one benchmark selected into ``docs/benchmarks/NAME.md`` instead: a variant run
(``bench_failover --term-beat``: ``--page failover-term-beat``) beside the default one.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "docs" / "benchmarks"
"""Where each benchmark's results page is written: ``docs/benchmarks/NAME.md``."""

PG_ROOT = Path("/usr/lib/postgresql")


def result_name(script: Path) -> str:
    """The results page's name: ``bench_failover.py`` -> ``failover``."""
    return script.stem.removeprefix("bench_")


def benchmarks(directory: Path = HERE) -> list[Path]:
    return sorted(directory.glob("bench_*.py"))


VARIANTS = {
    "failover-term-beat": ("bench_failover.py", "--term-beat --runs 7"),
    "footprint-term-beat": ("bench_footprint.py", "--term-beat"),
    "etcd_stalls-term-beat": ("bench_etcd_stalls.py", "--term-beat --stall-s 0.3 0.6"),
    "term_beat-100ms": ("bench_term_beat.py", "--interval-ms 100"),
    "remote-term-beat": ("bench_remote.py", "--term-beat 100/400/400 --lease-ttl 2"),
}
"""The results pages of variant runs (``--page``): page name -> (benchmark, its arguments)."""


def variant_command(page: str) -> str:
    """How the variant run ``page`` is made and written."""
    script, args = VARIANTS[page]
    stem = script.removesuffix(".py")
    return f"python -m bench.run_all --write --page {page} {stem} -- {args}"


# --- the machine and the tree a run measured ---------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (run.stdout or run.stderr).strip().splitlines()
    return lines[0].strip() if run.returncode == 0 and lines else "not found"


def _proc_field(path: str, key: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def _memory() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal")  # "16311712 kB"
    if not total or not total.split()[0].isdigit():
        return "unknown"
    return f"{int(total.split()[0]) / 1024**2:.1f} GiB"


def _postgres() -> str:
    # The newest Debian PostgreSQL, the one the benchmarks start (workshop_agent/pg/proc.py).
    found = sorted(
        PG_ROOT.glob("*/bin/postgres"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return _first_line([str(found[-1]), "--version"]) if found else "not found"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def machine() -> list[tuple[str, str]]:
    """What the figures depend on besides the code, as (what, value) rows."""
    return [
        ("CPU", _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"),
        ("cores", str(os.cpu_count() or "unknown")),
        ("memory", _memory()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("etcd", _first_line(["etcd", "--version"]).removeprefix("etcd Version: ")),
        ("PostgreSQL", _postgres()),
    ]


def commit(root: Path = ROOT) -> str:
    """The commit measured, and whether the tree differed from it (results pages aside)."""
    head = _first_line(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    changed = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", ".", ":!docs/benchmarks"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if head == "not found":
        return "unknown (not a git work tree)"
    return f"{head} with uncommitted changes" if changed else head


# --- a results page --------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One benchmark's run and what it printed."""

    script: str
    command: str
    started: datetime
    took_s: float
    load_before: str
    load_after: str
    output: str


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def page(run: Run, tree: str, facts: Sequence[tuple[str, str]], note: str = "") -> str:
    """The results page of ``run``: where and when it ran, then what it printed."""
    rows = [
        ("date", run.started.strftime("%Y-%m-%d %H:%M UTC")),
        ("commit", tree),
        ("command", f"`{run.command}`"),
        ("took", f"{run.took_s:.0f} s"),
        *facts,
        ("load average before", run.load_before),
        ("load average after", run.load_after),
    ]
    if note:
        rows.append(("note", note))
    fence = "````" if "```" in run.output else "```"
    return "\n".join(
        [
            f"# {Path(run.script).stem}: results",
            "",
            f"Written by `python -m bench.run_all --write` from what `bench/{run.script}` "
            "printed; the next successful run replaces it. What the figures measure and "
            "their targets: [Benchmarks](../benchmarks.md).",
            "",
            "| the run | |",
            "|---|---|",
            *(f"| {what} | {_cell(value)} |" for what, value in rows),
            "",
            f"{fence}text",
            run.output.rstrip(),
            fence,
            "",
        ]
    )


def write_page(path: Path, text: str) -> None:
    """Replace ``path`` whole or not at all (a reader never sees half a page)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


# --- running --------------------------------------------------------------------------


def run_one(argv: Sequence[str], cwd: Path, echo: Callable[[str], None]) -> tuple[int, str]:
    """Run a benchmark, echoing its standard output line by line as it comes (its
    figures), and return its exit code with that output. Its standard error (logs,
    tracebacks) goes to the terminal only."""
    lines: list[str] = []
    with subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line)
            lines.append(line)
        code = proc.wait()
    return code, "".join(lines)


def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def main(
    argv: Sequence[str],
    directory: Path = HERE,
    results: Path = RESULTS,
    echo: Callable[[str], None] = _echo,
) -> int:
    argv = list(argv)
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("filters", nargs="*", metavar="NAME-FILTER")
    parser.add_argument(
        "--write", action="store_true", help="write each successful run into its results page"
    )
    parser.add_argument(
        "--note", default="", help="a line for the results pages (what else ran, ...)"
    )
    parser.add_argument(
        "--page", default="", help="the results page's name, for one benchmark's variant run"
    )
    args = parser.parse_args(argv)
    if args.page and not re.fullmatch(r"[a-z0-9_-]+", args.page):
        parser.error(f"--page {args.page!r}: a page name is lowercase letters, digits, - and _")

    scripts = benchmarks(directory)
    if args.filters:
        scripts = [s for s in scripts if any(f in s.name for f in args.filters)]
    if not scripts:
        what = f" matching {' '.join(args.filters)}" if args.filters else ""
        echo(f"no benchmark{what} in {directory} (bench_*.py)\n")
        return 0
    if args.page and len(scripts) != 1:
        names = ", ".join(s.name for s in scripts)
        parser.error(f"--page names one results page: select one benchmark (these match: {names})")

    facts = machine() if args.write else []
    tree = commit(directory.parent) if args.write else ""
    outcomes: list[tuple[str, int, float]] = []
    for script in scripts:
        echo(f"\n=== {script.name} ===\n")
        command = [sys.executable, "-m", f"{directory.name}.{script.stem}", *bench_args]
        started, load_before = datetime.now(UTC), load_average()
        start = time.monotonic()
        try:
            code, output = run_one(command, directory.parent, echo)
        except KeyboardInterrupt:
            echo(f"\ninterrupted during {script.name}: nothing written\n")
            return 130
        took = time.monotonic() - start
        outcomes.append((script.name, code, took))
        if args.write and code == 0:
            shown = " ".join(["python", "-m", f"{directory.name}.{script.stem}", *bench_args])
            run = Run(script.name, shown, started, took, load_before, load_average(), output)
            target = results / f"{args.page or result_name(script)}.md"
            write_page(target, page(run, tree, facts, args.note))
            echo(f"written: {target}\n")
        elif args.write:
            echo(f"{script.name} failed (exit {code}): its results page is left as it was\n")

    echo("\n=== summary ===\n")
    for name, code, took in outcomes:
        echo(f"{'ok    ' if code == 0 else 'FAILED'} {name} ({took:.0f} s)\n")
    return 0 if all(code == 0 for _, code, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m bench.run_all --write``: a benchmark that succeeds has what it printed
written into its results page with the date, the commit, the machine and the command;
one that fails leaves its page as it was."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.run_all import main

OK = """import sys
print("figure", 1.5, "s")
print("args", *sys.argv[1:])
"""
FAILS = """import sys
print("half a figure")
sys.exit(3)
"""


def _benches(root: Path) -> Path:
    directory = root / "benches"
    directory.mkdir()
    (directory / "bench_ok.py").write_text(OK)
    (directory / "bench_fails.py").write_text(FAILS)
    return directory


def test_a_successful_run_is_written_and_a_failed_one_keeps_the_last_good_result(
    tmp_path: Path,
) -> None:
    directory, results = _benches(tmp_path), tmp_path / "results"
    results.mkdir()
    (results / "fails.md").write_text("the last good result\n")
    echoed: list[str] = []

    code = main(
        ["--write", "--note", "shared machine", "--", "--runs", "2"],
        directory,
        results,
        echoed.append,
    )

    assert code == 1  # one benchmark failed
    assert (results / "fails.md").read_text() == "the last good result\n"
    written = (results / "ok.md").read_text()
    assert written.startswith("# bench_ok: results\n")
    assert "figure 1.5 s\nargs --runs 2\n" in written  # what it printed, as printed
    assert "| command | `python -m benches.bench_ok --runs 2` |" in written
    for row in ("date", "commit", "took", "CPU", "cores", "memory", "kernel", "Python"):
        assert f"| {row} | " in written, row
    assert "| etcd | " in written and "| PostgreSQL | " in written
    assert "| note | shared machine |" in written
    assert f"| Python | {sys.version.split()[0]} |" in written
    # What each printed is shown as it ran, and where its page went.
    assert "half a figure\n" in echoed and f"written: {results / 'ok.md'}\n" in echoed
    assert not list(results.glob(".*"))  # no partial page left behind


def test_without_write_nothing_is_written(tmp_path: Path) -> None:
    directory, results = _benches(tmp_path), tmp_path / "results"
    assert main(["ok"], directory, results, lambda line: None) == 0
    assert not results.exists()


def test_a_filter_matching_nothing_runs_nothing(tmp_path: Path) -> None:
    echoed: list[str] = []
    assert main(["--write", "nothing"], _benches(tmp_path), tmp_path / "r", echoed.append) == 0
    assert echoed == [f"no benchmark matching nothing in {tmp_path / 'benches'} (bench_*.py)\n"]


def test_a_variant_run_is_written_to_the_page_it_names(tmp_path: Path) -> None:
    directory, results = _benches(tmp_path), tmp_path / "results"
    results.mkdir()
    (results / "ok.md").write_text("the default run\n")
    code = main(
        ["--write", "--page", "ok-variant", "ok", "--", "--fast"], directory, results, print
    )
    assert code == 0
    assert (results / "ok.md").read_text() == "the default run\n"
    assert "args --fast\n" in (results / "ok-variant.md").read_text()


def test_a_page_for_more_than_one_benchmark_is_refused(tmp_path: Path) -> None:
    directory, results = _benches(tmp_path), tmp_path / "results"
    with pytest.raises(SystemExit):
        main(["--write", "--page", "both"], directory, results, print)
    with pytest.raises(SystemExit):
        main(["--write", "--page", "../escape", "ok"], directory, results, print)
    assert not results.exists()

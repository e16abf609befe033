"""The documentation: it builds with ``mkdocs build --strict`` (every link and anchor
found, every page in the nav, the reference pages made from the code, with or without
the benchmarks' results pages), and the README stays a short first read whose links
all lead somewhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from markdown.extensions.toc import slugify  # installed with mkdocs (the dev extra)

from bench.run_all import RESULTS, VARIANTS, Run, benchmarks, machine, page, result_name
from hapair.shared.topology import site_schema
from tests.support.harness import ROOT

README_LIMIT = 15_000
"""Bytes: what a newcomer reads in the first hour; the rest is in docs/."""

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+?)(?: \{#([\w-]+)\})?$")

NOON = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def _build(root: Path, site: Path) -> None:
    """``mkdocs build --strict`` of the documentation in ``root``, this tree's code
    imported (the reference pages are made from it)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr


def test_docs_build_strict(tmp_path: Path) -> None:
    _build(ROOT, tmp_path)
    for built in ("reference/site-file", "reference/http-api", "reference/cli", "concepts"):
        assert (tmp_path / built / "index.html").is_file(), built
    # The generated pages carry what they are made from.
    site_ref = (tmp_path / "reference/site-file/index.html").read_text()
    assert "lease_ttl_s" in site_ref and "fence_margin_s" in site_ref
    api_ref = (tmp_path / "reference/http-api/index.html").read_text()
    assert "/v1/endpoints/{service}" in api_ref
    cli_ref = (tmp_path / "reference/cli/index.html").read_text()
    assert "hapair switchover" in cli_ref and "hapair-agent" in cli_ref
    for script in benchmarks(ROOT / "bench"):
        assert (tmp_path / "benchmarks" / result_name(script) / "index.html").is_file()


def _docs_copy(root: Path) -> Path:
    """The documentation and the benchmarks' names, copied into ``root``."""
    root.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", root)
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copytree(ROOT / "bench", root / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_docs_build_strict_without_any_results_page(tmp_path: Path) -> None:
    root = _docs_copy(tmp_path / "tree")
    shutil.rmtree(root / "docs" / RESULTS.name)
    _build(root, tmp_path / "site")
    page = (tmp_path / "site/benchmarks/footprint/index.html").read_text()
    assert "No results yet" in page and "run_all --write footprint" in page


def test_docs_build_strict_with_a_results_page_as_a_run_writes_it(tmp_path: Path) -> None:
    root = _docs_copy(tmp_path / "tree")
    output = "```\nactive agent CPU %   0.90  0.80  1.00  <= 1 % | a pipe\n"
    run = Run("bench_footprint.py", "python -m bench.bench_footprint", NOON, 61.0, "1", "2", output)
    (root / "docs" / RESULTS.name / "footprint.md").write_text(page(run, "0123abcd", machine()))
    _build(root, tmp_path / "site")
    html = (tmp_path / "site/benchmarks/footprint/index.html").read_text()
    assert "active agent CPU %" in html and "0123abcd" in html and "No results yet" not in html


def test_every_benchmark_has_its_results_page_in_the_nav() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    section = next(item["Benchmarks"] for item in nav if "Benchmarks" in item)
    results = next(item["Results"] for item in section if isinstance(item, dict))
    listed = sorted(path for entry in results for path in entry.values())
    names = [f"{RESULTS.name}/{result_name(s)}.md" for s in benchmarks(ROOT / "bench")]
    names += [f"{RESULTS.name}/{page}.md" for page in VARIANTS]
    assert listed == sorted(names)


def _anchors(markdown: str) -> set[str]:
    """The ids mkdocs gives a page's headings (an explicit ``{#id}`` or the slug)."""
    found, fenced = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else HEADING.match(line)
        if match:
            found.add(match.group(2) or slugify(match.group(1).replace("`", ""), "-"))
    return found


def test_readme_is_short_and_its_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < README_LIMIT
    targets = [t for t in LINK.findall(readme) if not t.startswith(("http://", "https://"))]
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        path, _, anchor = target.partition("#")
        path = path or "README.md"
        assert (ROOT / path).exists(), target
        if anchor:
            assert anchor in _anchors((ROOT / path).read_text()), target


SITE_FILE_PAGES = ("site-file.md", "database.md", "operations.md", "plc.md", "security.md")
"""Where the site file's fields are explained in prose (the reference gives their types
and defaults, from the models)."""


def _fields(schema: dict[str, Any]) -> set[str]:
    models = [schema, *schema.get("$defs", {}).values()]
    return {name for model in models for name in model.get("properties", {})}


def test_every_site_file_field_is_explained() -> None:
    prose = "\n".join((ROOT / "docs" / page).read_text() for page in SITE_FILE_PAGES)
    unexplained = sorted(
        name
        for name in _fields(site_schema())
        # named in a table or the text (`name`, `parent.name`), or as a key of an example
        # (a YAML line or an inline {key: value, ...})
        if not re.search(
            rf"`(?:[\w.]+\.)?{name}`|^\s*(?:- )?{name}:|[{{,] ?{name}:", prose, re.MULTILINE
        )
    )
    assert unexplained == []


def test_every_site_file_field_has_a_description() -> None:
    # The site-file reference and `hapair topology schema` (which editors show beside
    # each field) are made from these descriptions.
    schema = site_schema()
    models = {"Site": schema, **schema.get("$defs", {})}
    undescribed = sorted(
        f"{model}.{name}"
        for model, body in models.items()
        for name, field in body.get("properties", {}).items()
        if not field.get("description", "").strip()
    )
    assert undescribed == []

"""mkdocs hook: pages made at each build and handed to mkdocs as generated files
(nothing is written into docs/): the reference pages of ``reference.py``, and a
placeholder for each benchmark whose results page ``bench/run_all.py --write`` has not
written yet, so that the build passes with or without results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str) -> ModuleType:
    # docs/gen and bench/ are loaded from their files: the build needs no package path.
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def no_results_page(script: str, name: str, command: str | None = None) -> str:
    how = (
        f"`{command}` writes this page."
        if command is not None
        else f"`python -m bench.run_all --write {name}` (or\n`make bench BENCH={name}`) "
        "writes this page."
    )
    return "\n".join(
        [
            f"# {script}: results",
            "",
            f"No results yet: {how} What the benchmark measures and",
            "its targets: [Benchmarks](../benchmarks.md).",
            "",
        ]
    )


def on_files(files: Files, config: MkDocsConfig) -> Files:
    reference = _load(Path(__file__).with_name("reference.py"), "hapair_docs_reference")
    for path, text in reference.pages().items():
        files.append(File.generated(config, path, content=text))
    run_all = _load(ROOT / "bench" / "run_all.py", "hapair_bench_run_all")
    for script in run_all.benchmarks(ROOT / "bench"):
        name = run_all.result_name(script)
        path = f"{run_all.RESULTS.name}/{name}.md"
        if files.get_file_from_path(path) is None:
            files.append(File.generated(config, path, content=no_results_page(script.stem, name)))
    for name, (script_name, _) in run_all.VARIANTS.items():
        path = f"{run_all.RESULTS.name}/{name}.md"
        if files.get_file_from_path(path) is None:
            command = run_all.variant_command(name)
            text = no_results_page(script_name.removesuffix(".py"), name, command)
            files.append(File.generated(config, path, content=text))
    return files

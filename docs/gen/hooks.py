"""mkdocs hook: the reference pages of ``reference.py``, made at each build and handed
to mkdocs as generated files (nothing is written into docs/)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files


def _reference() -> ModuleType:
    # docs/gen is no package: the generator is loaded from its file.
    path = Path(__file__).with_name("reference.py")
    spec = importlib.util.spec_from_file_location("hapair_docs_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path, text in _reference().pages().items():
        files.append(File.generated(config, path, content=text))
    return files

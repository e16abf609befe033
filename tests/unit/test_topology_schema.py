"""``hapair topology schema``: the JSON Schema editors check site files with agrees with
the models that read them."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import jsonschema_rs
import pytest
import yaml

from hapair.shared.topology import TopologyError, parse_site, site_schema
from tests.support.harness import ROOT

EXAMPLES = ["deploy/demo-site.yaml", "deploy/site-example.yaml"]


def _example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_example_sites_pass_the_schema(name: str) -> None:
    assert list(jsonschema_rs.validator_for(site_schema()).iter_errors(_example(name))) == []


def _broken(change: str) -> dict[str, Any]:
    site = copy.deepcopy(_example("deploy/site-example.yaml"))
    service = site["workshops"][0]["pairs"][0]["services"][0]
    if change == "unknown field":
        service["comand"] = ["true"]
    elif change == "wrong type":
        service["critical"] = "very"
    elif change == "missing field":
        del service["name"]
    return site


@pytest.mark.parametrize("change", ["unknown field", "wrong type", "missing field"])
def test_what_the_models_refuse_the_schema_refuses(change: str) -> None:
    site = _broken(change)
    with pytest.raises(TopologyError):
        parse_site(site, "broken")
    assert list(jsonschema_rs.validator_for(site_schema()).iter_errors(site)) != []


def test_the_command_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from hapair.registry.console.cli import main; main()",
         "topology", "schema"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(site_schema()))

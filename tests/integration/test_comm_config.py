"""``hapair-comm --check`` on PLC lists, as a process."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.harness import PYTHON, ROOT
from tests.unit.test_comm_config import EXAMPLE


def test_check_flag_validates_without_starting(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(EXAMPLE)
    bad.write_text(
        "plcs: [{name: p, paths: [{host: h}], tags: [{name: t, address: Q1, type: int16}]}]"
    )
    cmd = [PYTHON, "-m", "hapair.comm_server.main", "--check", "--config"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "valid, 2 PLCs, 5 tags" in ok.stdout
    ko = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert ko.returncode == 2
    assert "plcs[0].tags[0].address: 'Q1' is not a Modbus address" in ko.stderr

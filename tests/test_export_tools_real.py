"""``salf export`` run in the real tools (slow; each needs its own virtual environment, outside the repo).

tests/test_export.py checks the exports against the tools' matching rules re-implemented from their sources;
these run the tools themselves on tiny models (scripts/check_export_llamafactory.py: LLaMA-Factory trains a few
steps with the exported config, and what it trained is compared with the plan and the export's NOTEs;
scripts/check_export_axolotl.py: the same for axolotl).
Skipped, with the reason, where the tool's environment is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LLAMAFACTORY_ENV = Path(os.environ.get("SALF_LLAMAFACTORY_ENV", "/work/.envs/llamafactory"))


@pytest.mark.slow
def test_llamafactory_trains_what_the_export_says(tmp_path: Path):
    if not (LLAMAFACTORY_ENV / "bin" / "python").is_file():
        pytest.skip(f"no LLaMA-Factory environment at {LLAMAFACTORY_ENV} (set SALF_LLAMAFACTORY_ENV; "
                    "scripts/check_export_llamafactory.py says how to make one)")
    record = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_export_llamafactory.py"),
                           "--env", str(LLAMAFACTORY_ENV), "--record", str(record)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "PASS" in proc.stdout
    result = json.loads(record.read_text())
    assert result["passed"] and result["tool_versions"]["llamafactory"]
    assert {c["case"] for c in result["cases"]} >= {"llama-boundary", "llama-tied-boundary", "gpt2-untie"}
    assert all(not c["problems"] for c in result["cases"])


AXOLOTL_ENV = Path(os.environ.get("SALF_AXOLOTL_ENV", "/work/.envs/axolotl"))


@pytest.mark.slow
def test_axolotl_trains_what_the_export_says(tmp_path: Path):
    if not (AXOLOTL_ENV / "bin" / "python").is_file():
        pytest.skip(f"no axolotl environment at {AXOLOTL_ENV} (set SALF_AXOLOTL_ENV; "
                    "scripts/check_export_axolotl.py says how to make one)")
    record = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_export_axolotl.py"),
                           "--env", str(AXOLOTL_ENV), "--record", str(record),
                           "--cases", "llama-boundary,llama-non-contiguous,gpt2-untie"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    result = json.loads(record.read_text())
    assert result["passed"] and all(not c["problems"] for c in result["cases"])

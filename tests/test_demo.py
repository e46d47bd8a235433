"""End to end on the real pretrained MiniLM-L6: slow, run with `./dev test -m slow`."""

import json

import pytest

from salf.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "6", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "boundary (first trained block)" in printed and "measured step time" in printed
    result = json.loads((out / "demo.json").read_text())
    plan = result["plan"]
    assert 0 <= plan["boundary"] <= 6 and plan["lens"] == "probe"
    assert result["runs"]["full"]["steps"] == result["runs"]["planned"]["steps"] == 6
    assert (out / "plan.png").stat().st_size > 10_000 and (out / "report.html").stat().st_size > 10_000
    assert main(["demo", "--out", str(out), "--steps", "6", "--no-progress"]) == 2  # refuses to overwrite

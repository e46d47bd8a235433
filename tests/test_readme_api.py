"""The README's Python example (model and data in memory: plan, apply, train) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- python-api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its marked Python API example"
    return match.group(1)


def test_the_readme_python_example_plans_applies_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes runs/api-example
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    plan, metrics = namespace["plan"], namespace["metrics"]
    assert 0 < plan.boundary < plan.num_layers  # budget=0.6 freezes some blocks and trains some
    assert metrics["boundary"] == plan.boundary and metrics["steps"] == 4
    assert (tmp_path / "runs" / "api-example" / "metrics.json").is_file()
    assert metrics["trainable_params"] < metrics["total_params"]  # the run trained the plan, not everything

"""salf.report: the HTML report of real (tiny) training runs, planned vs full fine-tuning."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import save_tiny, text_data

from salf.cli import main
from salf.errors import SalfError
from salf.report import report, write_report
from salf.report.figures import draw_curves
from salf.report.runs import load_runs

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plan (budget=0.6, so some blocks are frozen) and two 4-step runs: planned and full."""
    work = tmp_path_factory.mktemp("report")
    model, data = save_tiny(work, "llama"), text_data(work / "text.jsonl", n=24)
    source = ["--model", str(model), "--data", str(data), "--no-progress"]
    assert main(["plan", *source, "--out", str(work / "plan.json"), "--policy", "budget=0.6", "--sample-size", "16"]) == 0
    assert json.loads((work / "plan.json").read_text())["boundary"] > 0
    common = [*source, "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3"]
    assert main(["train", *common, "--out", str(work / "planned"), "--plan", str(work / "plan.json")]) == 0
    assert main(["train", *common, "--out", str(work / "full")]) == 0
    return work


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_report_of_planned_and_full_runs(runs, tmp_path):
    out = write_report([runs / "planned", runs / "full"], tmp_path / "r" / "report.html")
    assert out == tmp_path / "r" / "report.html"
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # written atomically, no temp left
    page = out.read_text()
    # Self-contained: no scripts, nothing fetched, every image inline.
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    pngs = images(page)
    assert len(pngs) == 5  # trace + gains + cost-benefit, training curves, predicted vs measured
    assert all(p.startswith(PNG_MAGIC) and len(p) > 5000 for p in pngs)
    plan = json.loads((runs / "plan.json").read_text())
    k = plan["boundary"]
    assert f"Plan: train blocks {k}..3 of 4" in page and f"{k} of 4" in page
    assert f"{plan['predicted']['step_flops_ratio']:.4g}" in page
    planned, full = metrics(runs / "planned"), metrics(runs / "full")
    ratio = planned["flops_per_padded_token"] / full["flops_per_padded_token"]
    assert f"{ratio:.4g}" in page and f"{ratio:.2f}× full" in page
    for name, m in (("planned", planned), ("full", full)):
        row = re.search(rf"<tr><td>{name}</td>(.*?)</tr>", page.split("Runs compared")[1]).group(1)
        assert f"<td>{m['boundary']}</td>" in row and f"<td>{m['eval_loss']:.4g}</td>" in row


def test_savings_are_measured_against_the_full_run(runs, tmp_path):
    result = report(str(runs / "planned"), [str(runs / "full")], out=str(tmp_path / "report.html"))
    assert result.path.is_file() and str(result.path) in result.render()
    assert result.full_run == "full" and [r.name for r in result.runs] == ["planned", "full"]
    planned, full = metrics(runs / "planned"), metrics(runs / "full")
    plan = json.loads((runs / "plan.json").read_text())
    (saving,) = result.savings
    assert saving.run == "planned" and saving.boundary == plan["boundary"]
    assert saving.predicted_step_flops == plan["predicted"]["step_flops_ratio"]
    assert saving.measured_flops_per_token == planned["flops_per_padded_token"] / full["flops_per_padded_token"]
    assert saving.measured_train_flops == planned["train_flops"] / full["train_flops"]
    assert saving.measured_step_time == planned["step_seconds_median"] / full["step_seconds_median"]
    assert saving.eval_loss_delta == pytest.approx(planned["eval_loss"] - full["eval_loss"])
    # The cost model and the run agree on what is trainable, and (same data) roughly on the FLOPs.
    assert saving.measured_trainable_params == pytest.approx(saving.predicted_trainable_params, rel=0.05)
    assert saving.measured_flops_per_token < 1.0
    assert json.loads(json.dumps(result.to_json()))["savings"][0]["run"] == "planned"


def test_training_curves_draw_one_line_per_run(runs):
    loaded = load_runs([runs / "planned", runs / "full"])
    fig = draw_curves(loaded)
    by_step, by_flops = fig.axes
    lines = [line for line in by_step.get_lines() if not line.get_label().endswith("eval loss")]
    k = loaded[0].plan.boundary
    assert [line.get_label() for line in lines] == [r.label for r in loaded] == [f"planned (k={k})", "full (full)"]
    for line, run in zip(lines, loaded):
        assert list(line.get_xdata()) == [h["step"] for h in run.history] == [1, 2, 3, 4]
        assert list(line.get_ydata()) == [h["loss"] for h in run.history]
    for line, run in zip(by_flops.get_lines(), loaded):
        tokens = [h["tokens"] for h in run.history]
        per_token = run.metrics["flops_per_padded_token"]
        assert list(line.get_xdata()) == pytest.approx([sum(tokens[: i + 1]) * per_token for i in range(len(tokens))])
    eval_marks = [line for line in by_step.get_lines() if line.get_label().endswith("eval loss")]
    assert [list(m.get_ydata()) for m in eval_marks] == [[r.metrics["eval_loss"]] for r in loaded]


def test_a_demo_folder_stands_for_its_runs(runs, tmp_path):
    demo = tmp_path / "demo"
    shutil.copytree(runs / "planned", demo / "planned")
    shutil.copytree(runs / "full", demo / "full")
    shutil.copy(runs / "plan.json", demo / "plan.json")
    (demo / "planned" / "plan.json").unlink()  # the plan beside the runs serves the planned one
    out = write_report(demo)
    assert out == demo / "report.html"
    page = out.read_text()
    assert len(images(page)) == 5 and "Used by: planned." in page
    assert [r.name for r in load_runs(demo)] == ["full", "planned"]


def test_without_a_full_run_the_saving_is_not_invented(runs, tmp_path):
    result = report(str(runs / "planned"), out=str(tmp_path / "report.html"))
    assert result.full_run is None and result.savings == []
    page = result.path.read_text()
    assert "No full fine-tuning run" in page and "--compare" in page
    assert len(images(page)) == 4  # plan figures and curves; no measured-savings chart
    assert "no full fine-tuning run" in result.render()


def test_names_are_unique_and_escaped(runs, tmp_path):
    for parent in ("a", "b"):
        shutil.copytree(runs / "full", tmp_path / parent / "run")
    shutil.copytree(runs / "planned", tmp_path / "x<script>y")
    loaded = load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "x<script>y"])
    assert [r.name for r in loaded] == ["a/run", "b/run", "x<script>y"]
    page = write_report([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "x<script>y"],
                        tmp_path / "r.html").read_text()
    assert "<script" not in page and "x&lt;script&gt;y" in page


def test_bad_run_directories_are_clear_errors(runs, tmp_path):
    with pytest.raises(SalfError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SalfError, match="no training run") as info:
        write_report(tmp_path / "empty")
    assert "salf train" in info.value.fix
    shutil.copytree(runs / "full", tmp_path / "broken")
    (tmp_path / "broken" / "metrics.json").write_text('{"steps": 4,\n "boundary": }')
    with pytest.raises(SalfError, match=r"metrics file .* is not valid JSON \(line 2"):
        write_report(tmp_path / "broken")
    (tmp_path / "out-dir").mkdir()
    with pytest.raises(SalfError, match="is a directory"):
        write_report(runs / "full", tmp_path / "out-dir")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_chromium(runs, tmp_path):
    from PIL import Image

    page = write_report([runs / "planned", runs / "full"], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run([str(ROOT / "scripts" / "screenshot_report.sh"), str(page), str(shot), "1280,1600"],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    r, g, b = image.getpixel((20, 20))  # the header band is drawn: the CSS applied
    assert b > r + 30 and b < 140
    small = image.resize((320, 400))
    colours = small.getcolors(maxcolors=1 << 16)
    assert len(colours) > 200  # figures and text, not a blank or error page
    background = sum(n for n, c in colours if c in ((245, 246, 248), (255, 255, 255)))
    assert background < 0.9 * 320 * 400

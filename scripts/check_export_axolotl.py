"""Run `salf export --to axolotl` in axolotl itself and check that it trains what the plan says.

The cases of scripts/check_export_llamafactory.py (tiny Llama untied and tied, GPT-2 with its tied head; plans
from `salf plan` and hand-built), exported with `salf export --to axolotl`, trained for a few steps on CPU by
`python -m axolotl.cli.train CONFIG.yaml` in axolotl's own virtual environment. axolotl's run is a separate
process, so the check reads what it saved: the tensors that changed are the plan's trainable set (except where
the export's NOTE says otherwise), and every other tensor is bit-identical to the initial weights.

    .venv/bin/python scripts/check_export_axolotl.py [--env /work/.envs/axolotl] [--steps 3] [--cases ...]

The environment (``--env``, default $SALF_AXOLOTL_ENV or /work/.envs/axolotl): axolotl 0.19.0 with --no-deps and
the part of its pinned dependencies that `axolotl.cli.train` imports on CPU:

    python3.11 -m venv /work/.envs/axolotl
    /work/.envs/axolotl/bin/pip install torch==2.13.0
    /work/.envs/axolotl/bin/pip install packaging==26.0 huggingface_hub==1.17.0 peft==0.20.0 tokenizers==0.23.1 \
        transformers==5.16.1 accelerate==1.13.0 datasets==4.8.4 trl==1.9.0 pydantic==2.12.5 addict fire \
        PyYAML==6.0.3 requests einops colorama "numpy>=2.1,<3" scipy sentencepiece fastcore \
        typing-extensions==4.15.0 python-dotenv==1.0.1 art optimum==1.16.2 schedulefree==1.4.1 \
        axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6 immutabledict==4.2.0 zstandard==0.22.0 \
        posthog==6.7.11 pillow numba evaluate wandb bitsandbytes==0.50.2
    /work/.envs/axolotl/bin/pip install --no-deps "triton>=3.4.0" axolotl==0.19.0
    /work/.envs/axolotl/bin/pip install huggingface_hub==1.17.0   # if a later install moved it

(left out: xformers, torchao, liger-kernel, fla, gradio, modal, lm_eval, cloud file systems.)
Exit status: 0 when every case matches, 1 on any mismatch or failed run, 2 when the environment is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_export_llamafactory as lf  # noqa: E402  (cases, models, plans, NOTE parsing)

DEFAULT_ENV = os.environ.get("SALF_AXOLOTL_ENV", "/work/.envs/axolotl")
DEFAULT_RECORD = lf.REPO / "bench" / "results" / "export-check" / "axolotl.json"
NOTE_EXTRA = lf.re.compile(r"NOTE: axolotl also trains (\d+) parameter\(s\) the plan freezes: (.*)$")
NOTE_MISSING = lf.re.compile(r"NOTE: axolotl leaves frozen (\d+) parameter\(s\) the plan trains: (.*)$")
TOOL_PACKAGES = ("axolotl", "transformers", "peft", "trl", "accelerate", "datasets", "torch")


def _config(export: str, folder: Path, data: Path, out: Path, steps: int) -> str:
    return export + f"""
# added by scripts/check_export_axolotl.py
base_model: {json.dumps(str(folder))}
datasets:
  - path: {json.dumps(str(data))}
    ds_type: json
    type: alpaca
dataset_prepared_path: {json.dumps(str(out.parent / "prepared"))}
output_dir: {json.dumps(str(out))}
sequence_len: 64
micro_batch_size: 2
gradient_accumulation_steps: 1
max_steps: {steps}
num_epochs: 1
learning_rate: 0.001
optimizer: adamw_torch
lr_scheduler: constant
bf16: false
fp16: false
tf32: false
save_safetensors: true
logging_steps: 1
val_set_size: 0
seed: 0
"""


def _compare(name: str, case_dir: Path, export: str, ctx) -> dict:
    from safetensors.torch import load_file

    problems: list[str] = []
    before = load_file(str(case_dir / "model" / "model.safetensors"))
    saved = case_dir / "out" / "model.safetensors"
    if not saved.is_file():
        return {"case": name, "problems": ["axolotl saved no model.safetensors"]}
    after = load_file(str(saved))
    if set(after) != set(before):
        problems.append(f"saved tensors differ in names: {sorted(set(after) ^ set(before))[:6]}")
    changed, identical = set(), set()
    for key in set(before) & set(after):
        a, b = before[key], after[key]
        same = a.dtype == b.dtype and a.shape == b.shape and bool(
            (a.view(-1).view(lf._int_of(a)) == b.view(-1).view(lf._int_of(b))).all())
        (identical if same else changed).add(key)
    plan = set(ctx.trainable) & set(before)
    extra, missing = changed - plan, plan - changed
    stated_extra, stated_missing = lf._stated(export, NOTE_EXTRA), lf._stated(export, NOTE_MISSING)
    if not lf._note_agrees(stated_extra, extra):
        problems.append(f"axolotl also trained {sorted(extra)[:6]}, the NOTE says {stated_extra}")
    if not lf._note_agrees(stated_missing, missing):
        problems.append(f"axolotl left {sorted(missing)[:6]} unchanged, the NOTE says {stated_missing}")
    if "does not match the fingerprint" in export:
        problems.append("the export says the model's config does not match the plan's, but the plan was made from it")
    return {"case": name, "problems": problems, "plan": sorted(plan), "trained": sorted(changed),
            "extra": sorted(extra), "missing": sorted(missing), "changed": len(changed),
            "frozen_identical": f"{len(identical)}/{len(set(before) - changed)}",
            "config": [line for line in export.splitlines() if line and not line.startswith("#")],
            "notes": [line[len("# NOTE: "):] for line in export.splitlines() if line.startswith("# NOTE: ")]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default=DEFAULT_ENV)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cases", default=",".join(lf.CASES))
    p.add_argument("--keep", default=None)
    p.add_argument("--record", default=str(DEFAULT_RECORD))
    a = p.parse_args(argv)
    python = Path(a.env) / "bin" / "python"
    if not python.is_file():
        print(f"no axolotl environment at {a.env} (see this script's docstring to set one up)", file=sys.stderr)
        return 2
    names = [c for c in a.cases.split(",") if c]
    if a.keep:
        Path(a.keep).mkdir(parents=True, exist_ok=True)
        return _check(Path(a.keep), python, names, a)
    with tempfile.TemporaryDirectory(prefix="salf-axolotl-check-") as tmp:
        return _check(Path(tmp), python, names, a)


def _check(work: Path, python: Path, names: list[str], a) -> int:
    from salf.export.context import export_context
    from salf.method.plan import Plan

    salf_data, dataset_dir = lf._write_data(work)
    rows = json.loads((dataset_dir / "tiny.json").read_text())
    data = work / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
           "DO_NOT_TRACK": "1", "WANDB_DISABLED": "true", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    results, seconds = [], 0.0
    for name in names:
        model_type, overrides, how = lf.CASES[name]
        case_dir = work / name
        case_dir.mkdir(exist_ok=True)
        folder = lf._save_model(case_dir / "model", model_type, overrides)
        plan_path = case_dir / "plan.json"
        if how[0] == "cli":
            lf._cli(["plan", "--model", str(folder), "--data", str(salf_data), "--policy", how[1], "--out",
                     str(plan_path), "--sample-size", "16", "--no-progress"])
        else:
            lf._hand_plan(folder, how[1], how[2]).save(plan_path)
        export_path = case_dir / "axolotl.yaml"
        lf._cli(["export", str(plan_path), "--to", "axolotl", "--model", str(folder), "--out", str(export_path)])
        export = export_path.read_text()
        config = case_dir / "train.yaml"
        config.write_text(_config(export, folder, data, case_dir / "out", a.steps))
        t0 = time.perf_counter()
        proc = subprocess.run([str(python), "-m", "axolotl.cli.train", str(config)], cwd=case_dir, env=env,
                              capture_output=True, text=True)
        seconds += time.perf_counter() - t0
        (case_dir / "tool.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            results.append({"case": name, "problems": [f"axolotl failed (exit {proc.returncode}): "
                                                       + (proc.stderr.strip().splitlines() or ["?"])[-1]]})
            continue
        results.append(_compare(name, case_dir, export, export_context(Plan.load(plan_path), model_path=str(folder))))
    versions = json.loads(subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
         + repr(TOOL_PACKAGES) + "}))"], capture_output=True, text=True, env=env).stdout)
    salf_versions = {k: importlib.metadata.version(k) for k in ("salf", "transformers", "torch")}
    ok = all(not r["problems"] for r in results)
    print(f"axolotl side: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    print(f"salf side: {', '.join(f'{k} {v}' for k, v in salf_versions.items())}")
    print(f"{a.steps} steps per case, {seconds:.0f} s in axolotl\n")
    head = ("case", "plan trains", "axolotl trained (changed)", "NOTE diff (+/-)", "frozen identical", "ok")
    table = [(r["case"], lf._span(r.get("plan", [])), lf._span(r.get("trained", [])),
              f"+{len(r.get('extra', []))}/-{len(r.get('missing', []))}", r.get("frozen_identical", ""),
              "ok" if not r["problems"] else "FAIL") for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    for cells in [head, *table]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |")
    lf.report(results, ok, "axolotl", "axolotl", a.record, {
        "check": "scripts/check_export_axolotl.py", "passed": ok, "steps": a.steps,
        "tool_versions": versions, "salf_side": salf_versions})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

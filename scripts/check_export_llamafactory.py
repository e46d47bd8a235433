"""Run `salf export --to llamafactory` in LLaMA-Factory itself and check that it trains what the plan says.

salf's LLaMA-Factory export is otherwise checked against LLaMA-Factory's matching rules re-implemented in
tests/test_export.py. Here the real tool trains: for each case, a tiny model (4 blocks; Llama untied and
tied, GPT-2 with its tied head) and its tokenizer are saved to a temporary folder, a plan is made
(`salf plan` itself for two cases, hand-built plans for the shapes a boundary cannot give), exported with
`salf export --to llamafactory`, and the exported YAML (plus the keys naming the model, data and run) is
trained for a few steps on CPU by LLaMA-Factory's own entry point (`llamafactory.train.tuner.run_exp`, what
`llamafactory-cli train` calls) in its own virtual environment. Then, per case:

- LLaMA-Factory's trainable set (``requires_grad`` when training starts) is the plan's, except exactly where
  the export's NOTE says it differs (the count and the names the NOTE gives);
- the parameters that got a gradient, and the tensors that changed in the saved safetensors, are that set;
- every other tensor in the saved model is bit-identical to the initial weights.

    .venv/bin/python scripts/check_export_llamafactory.py [--env /work/.envs/llamafactory] [--steps 3]
        [--cases llama-boundary,gpt2-untie] [--keep DIR] [--record bench/results/export-check/llamafactory.json]

The tool's environment (``--env``, default $SALF_LLAMAFACTORY_ENV or /work/.envs/llamafactory) holds
llamafactory and its own transformers/peft/trl, apart from salf's; the two sides talk through files. Set it up
(CPU torch first, so pip does not pull a CUDA build; torchaudio/torchvision, gradio, modelscope left out):

    python3.11 -m venv /work/.envs/llamafactory
    /work/.envs/llamafactory/bin/pip install torch==2.13.0
    /work/.envs/llamafactory/bin/pip install "transformers>=4.55,<=5.6,!=4.57.0" "peft>=0.18,<=0.18.1" \
        "trl>=0.18,<=0.24" "accelerate>=1.3,<=1.11" "datasets>=2.16,<=4.0" einops fire numpy omegaconf \
        packaging pandas protobuf pydantic pyyaml safetensors scipy sentencepiece tiktoken "tyro<0.9" matplotlib
    /work/.envs/llamafactory/bin/pip install --no-deps llamafactory==0.9.5

LLaMA-Factory 0.9.5 imports torchaudio when its data module loads (llamafactory/data/mm_plugin.py; it is used
only to read audio inputs), and no torchaudio wheel matches torch 2.13 (the newest, 2.11.1, fails to load its
extension). So the tool side imports LLaMA-Factory with an empty stand-in module for torchaudio, then removes it
(transformers still finds no torchaudio); a text run never touches it. The run records that it did so.

Exit status: 0 when every case matches, 1 on any mismatch or failed run, 2 when the environment is missing.
This file is also the tool-side runner (``--in-tool JOB``, run by the environment's python): that mode
imports nothing from salf.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENV = os.environ.get("SALF_LLAMAFACTORY_ENV", "/work/.envs/llamafactory")
DEFAULT_RECORD = REPO / "bench" / "results" / "export-check" / "llamafactory.json"
TOOL_PACKAGES = ("llamafactory", "transformers", "peft", "trl", "accelerate", "datasets", "torch")
WORDS = ("the cat dog bird fish sat ran flew swam on in under over mat tree sky sea red blue green "
         "small big fast slow a one two three happy sad then").split()

# name -> (model type, config overrides, how the plan is made)
#   ("cli", policy): `salf plan` on the tiny model and prompt/completion data;
#   ("blocks", [...], head): a hand-built plan training these blocks (+ final norm and head).
CASES: dict[str, tuple[str, dict, tuple]] = {
    "llama-boundary": ("llama", {}, ("cli", "freeze-first-half")),
    "llama-non-contiguous": ("llama", {}, ("blocks", [1, 3], None)),
    "llama-head-only": ("llama", {}, ("blocks", [], None)),
    "llama-first-blocks": ("llama", {}, ("blocks", [0, 1], None)),
    "llama-full": ("llama", {}, ("blocks", [0, 1, 2, 3], None)),
    "llama-tied-boundary": ("llama", {"tie_word_embeddings": True}, ("blocks", [2, 3], "tied")),
    "gpt2-untie": ("gpt2", {}, ("cli", "freeze-first-half")),
}


# -- tool side (the LLaMA-Factory environment's python; no salf imports) ----------------------------------


def _import_llamafactory() -> list[str]:
    """Import LLaMA-Factory's trainer entry; returns the workarounds it needed."""
    import importlib.util
    import types

    workarounds = []
    try:
        import torchaudio  # noqa: F401
    except Exception as e:  # missing, or a wheel built for another torch
        from transformers.utils import import_utils

        sys.modules.pop("torchaudio", None)
        import_utils.is_torchaudio_available()  # cached as False before the stand-in exists
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        try:
            import llamafactory.data.mm_plugin  # noqa: F401  (its `import torchaudio` binds the stand-in)
        finally:
            del sys.modules["torchaudio"]
        assert importlib.util.find_spec("torchaudio") is None or not isinstance(e, ModuleNotFoundError)
        workarounds.append(f"torchaudio not importable ({type(e).__name__}); LLaMA-Factory imported with an empty "
                           "stand-in module for it (llamafactory/data/mm_plugin.py imports it for audio inputs only)")
    import llamafactory.train.tuner  # noqa: F401

    return workarounds


def run_in_tool(job_path: str) -> int:
    """Train every case of the job with LLaMA-Factory and record what it trained."""
    import importlib.metadata

    job = json.loads(Path(job_path).read_text())
    workarounds = _import_llamafactory()
    from llamafactory.train.tuner import run_exp
    from omegaconf import OmegaConf
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.names: list[str] = []
            self.requires_grad: list[str] = []
            self.dtypes: dict[str, str] = {}
            self.grads: set[str] = set()
            self.steps = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.names = [n for n, _ in model.named_parameters()]
            self.requires_grad = [n for n, p in model.named_parameters() if p.requires_grad]
            self.dtypes = {n: str(p.dtype) for n, p in model.named_parameters()}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.steps += 1
            for n, p in model.named_parameters():
                if p.grad is not None and bool(p.grad.abs().sum() > 0):
                    self.grads.add(n)

    versions = {}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    records = {}
    for case in job["cases"]:
        # What `llamafactory-cli train CONFIG.yaml` does with its file (llamafactory.hparams.parser.read_args).
        args = OmegaConf.to_container(OmegaConf.load(case["config"]))
        recorder = Recorder()
        t0 = time.perf_counter()
        try:
            run_exp(args, callbacks=[recorder])
            error = None
        except Exception:
            error = traceback.format_exc()
        records[case["name"]] = {
            "names": recorder.names, "requires_grad": recorder.requires_grad, "grads": sorted(recorder.grads),
            "dtypes": recorder.dtypes, "optimizer_steps": recorder.steps, "error": error,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    Path(job["out"]).write_text(json.dumps({"versions": versions, "workarounds": workarounds, "records": records}))
    return 0


# -- salf side (the project's venv) -----------------------------------------------------------------------


def _save_model(folder: Path, model_type: str, overrides: dict) -> Path:
    from salf.models.loading import tiny_tokenizer
    from salf.models.tiny import tiny_model

    model = tiny_model(model_type, "causal-lm", **overrides)
    # GPT-2 style tokenizer for GPT-2 (no <s> in front, no pad token), Llama style otherwise.
    gpt2 = model_type == "gpt2"
    tokenizer = tiny_tokenizer(WORDS * 2, pad=not gpt2, bos=not gpt2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _rows(n: int = 16, seed: int = 0) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:-1]) for _ in range(6)]
        rows.append((" ".join(words) + " then", words[-1]))
    return rows


def _write_data(work: Path) -> tuple[Path, Path]:
    """salf's prompt/completion JSONL (for `salf plan`) and an alpaca-format LLaMA-Factory dataset dir."""
    rows = _rows()
    salf_data = work / "data.jsonl"
    salf_data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    dataset_dir = work / "lf-data"
    dataset_dir.mkdir()
    (dataset_dir / "tiny.json").write_text(json.dumps(
        [{"instruction": p, "input": "", "output": c} for p, c in rows], indent=1))
    (dataset_dir / "dataset_info.json").write_text(json.dumps({"salf_tiny": {"file_name": "tiny.json"}}, indent=1))
    return salf_data, dataset_dir


def _hand_plan(folder: Path, blocks: list[int], head: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    from salf.method.plan import Plan, Prediction, model_fingerprint
    from salf.models.loading import load_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(str(folder), {}))
    num_layers = len(model.get_decoder().layers) if hasattr(model.get_decoder(), "layers") else len(model.transformer.h)
    full = blocks == list(range(num_layers))
    boundary = 0 if full else (blocks[0] if blocks else num_layers)
    return Plan(
        boundary=boundary, num_layers=num_layers,
        trainable={"blocks": blocks, "embeddings": full, "norm": True, "head": True},
        trace=[0.0] * (num_layers + 1), trace_std=[0.0] * (num_layers + 1), gains=[1.0] * num_layers, fit={},
        lens="logit", estimator="hand-built", policy=f"blocks {blocks}", benefit=[], cost=[],
        # a placeholder prediction: no cost model behind a hand-built plan (export never reads it)
        predicted=Prediction(step_flops_ratio=1.0, step_flops_saving=0.0, backward_flops_ratio=1.0,
                             activation_memory_ratio=1.0, training_memory_ratio=1.0, trainable_params_ratio=1.0,
                             step_flops=0.0, full_step_flops=0.0),
        model={**model_fingerprint(model), "name_or_path": str(folder)}, data={}, head=head,
    )


def _cli(argv: list[str]) -> None:
    from salf.cli import main

    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"salf {' '.join(argv)} failed ({rc})")


NOTE_EXTRA = re.compile(r"NOTE: LLaMA-Factory also trains (\d+) parameter\(s\) the plan freezes: (.*)$")
NOTE_MISSING = re.compile(r"NOTE: LLaMA-Factory leaves frozen (\d+) parameter\(s\) the plan trains: (.*)$")


def _stated(export: str, pattern: re.Pattern) -> tuple[int, list[str]] | None:
    for line in export.splitlines():
        m = pattern.search(line)
        if m:
            names = [n for n in m.group(2).split(", ") if n != "..."]
            return int(m.group(1)), names
    return None


def _note_agrees(stated: tuple[int, list[str]] | None, actual: set[str]) -> bool:
    """The NOTE gives the count and the first six names (sorted); no NOTE means no difference."""
    if stated is None:
        return not actual
    count, names = stated
    return count == len(actual) and names == sorted(actual)[: len(names)] and len(names) == min(6, count)


def _span(names: set[str] | list[str]) -> str:
    """A short human summary of a set of parameter names: blocks by index, others by module."""
    blocks, others = set(), set()
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        if m:
            blocks.add(int(m.group(1)))
        else:
            others.add(n.rsplit(".", 1)[0] if "." in n else n)
    parts = []
    if blocks:
        from salf.export.context import block_span

        parts.append("b" + block_span(blocks))
    parts += sorted(o.rsplit(".", 1)[-1] for o in others)
    return "+".join(parts) if parts else "-"


def _compare(name: str, case_dir: Path, export: str, ctx, record: dict) -> dict:
    from safetensors.torch import load_file

    result: dict = {"case": name, "problems": []}
    problems = result["problems"]
    if record.get("error"):
        problems.append("LLaMA-Factory failed: " + record["error"].strip().splitlines()[-1])
        result["error"] = record["error"]
        return result
    names = set(ctx.names)
    plan = set(ctx.trainable)
    trained = set(record["requires_grad"])
    if set(record["names"]) != names:
        problems.append(f"parameter names differ from the export's: {sorted(set(record['names']) ^ names)[:6]}")
    extra, missing = trained - plan, plan - trained
    stated_extra, stated_missing = _stated(export, NOTE_EXTRA), _stated(export, NOTE_MISSING)
    if not _note_agrees(stated_extra, extra):
        problems.append(f"LLaMA-Factory also trains {sorted(extra)}, the NOTE says {stated_extra}")
    if not _note_agrees(stated_missing, missing):
        problems.append(f"LLaMA-Factory leaves frozen {sorted(missing)}, the NOTE says {stated_missing}")
    if "does not match the fingerprint" in export:
        problems.append("the export says the model's config does not match the plan's, but the plan was made from it")
    grads = set(record["grads"])
    if grads != trained:
        problems.append(f"gradients on {sorted(grads ^ trained)[:6]} disagree with requires_grad")
    if record["optimizer_steps"] < 1:
        problems.append("no optimizer step ran")
    before = load_file(str(case_dir / "model" / "model.safetensors"))
    saved = case_dir / "out" / "model.safetensors"
    changed, identical = set(), set()
    if not saved.is_file():
        problems.append("LLaMA-Factory saved no model.safetensors")
    else:
        after = load_file(str(saved))
        if set(after) != set(before):
            problems.append(f"saved tensors differ in names: {sorted(set(after) ^ set(before))[:6]}")
        for key in set(before) & set(after):
            a, b = before[key], after[key]
            same = a.dtype == b.dtype and a.shape == b.shape and bool((a.view(-1).view(_int_of(a)) ==
                                                                       b.view(-1).view(_int_of(b))).all())
            (identical if same else changed).add(key)
        if changed != trained & set(before):
            problems.append(f"changed tensors {sorted(changed ^ (trained & set(before)))[:6]} disagree with the "
                            "trained set")
    result.update(
        plan=sorted(plan), trained=sorted(trained), extra=sorted(extra), missing=sorted(missing),
        stated_extra=stated_extra, stated_missing=stated_missing, grads=len(grads), changed=len(changed),
        frozen_identical=f"{len(identical)}/{len(set(before) - trained)}",
        config=[line for line in export.splitlines() if line and not line.startswith("#")],
        notes=[line[len("# NOTE: "):] for line in export.splitlines() if line.startswith("# NOTE: ")],
        optimizer_steps=record["optimizer_steps"], seconds=record["seconds"],
        dtypes=sorted(set(record["dtypes"].values())),
    )
    return result


def _int_of(t):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def _table(results: list[dict]) -> str:
    head = ("case", "plan trains", "LLaMA-Factory config", "LF trains", "NOTE diff (+/-)", "grads", "changed",
            "frozen identical", "ok")
    rows = []
    for r in results:
        if "trained" not in r:
            rows.append((r["case"], "", "", "", "", "", "", "", "FAIL"))
            continue
        config = "; ".join(c.replace("freeze_", "").replace("finetuning_type: ", "") for c in r["config"]
                           if not c.startswith("freeze_trainable_modules"))
        diff = f"+{len(r['extra'])}/-{len(r['missing'])}"
        rows.append((r["case"], _span(r["plan"]), config, _span(r["trained"]), diff, str(r["grads"]),
                     str(r["changed"]), r["frozen_identical"], "ok" if not r["problems"] else "FAIL"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _train_config(export: str, folder: Path, dataset_dir: Path, out: Path, steps: int) -> str:
    extra = {
        "model_name_or_path": str(folder), "trust_remote_code": False,
        "stage": "sft", "do_train": True,
        "dataset": "salf_tiny", "dataset_dir": str(dataset_dir), "template": "empty", "cutoff_len": 64,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
        "output_dir": str(out), "overwrite_output_dir": True, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "seed": 0, "bf16": False, "fp16": False,
    }
    return export + "\n# added by scripts/check_export_llamafactory.py\n" + "".join(
        f"{k}: {json.dumps(v)}\n" for k, v in extra.items())


def report(results: list[dict], ok: bool, tool: str, key: str, record: str | None, fields: dict,
           drop: tuple[str, ...] = ("plan", "trained")) -> None:
    """Print each case's NOTEs and mismatches and the verdict; write ``record`` (JSON: ``fields``, the date, the
    Python version and every case, its plan and what ``tool`` trained as block spans) when given. Shared by the
    axolotl check."""
    for r in results:
        for note in r.get("notes", []):
            if not note.startswith("this only sets requires_grad"):
                print(f"  {r['case']}: NOTE {note}")
        for problem in r["problems"]:
            print(f"  {r['case']}: MISMATCH {problem}")
    print(f"\nPASS: {tool} trains exactly what each export says" if ok else "\nFAIL")
    if not record:
        return
    path = Path(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        **fields, "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
        "cases": [{k: v for k, v in r.items() if k not in drop} |
                  {"plan_trains": _span(r.get("plan", [])), f"{key}_trains": _span(r.get("trained", []))}
                  for r in results],
    }, indent=1) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default=DEFAULT_ENV, help="virtual environment holding llamafactory")
    p.add_argument("--steps", type=int, default=3, help="training steps per case")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary folder)")
    p.add_argument("--record", default=str(DEFAULT_RECORD), help="write the result (JSON) here; '' to skip")
    p.add_argument("--in-tool", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.in_tool:
        return run_in_tool(a.in_tool)
    python = Path(a.env) / "bin" / "python"
    if not python.is_file():
        print(f"no LLaMA-Factory environment at {a.env} (see this script's docstring to set one up)", file=sys.stderr)
        return 2
    names = [c for c in a.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if a.keep:
        Path(a.keep).mkdir(parents=True, exist_ok=True)
        return _check(Path(a.keep), python, names, a)
    with tempfile.TemporaryDirectory(prefix="salf-lf-check-") as tmp:
        return _check(Path(tmp), python, names, a)


def _check(work: Path, python: Path, names: list[str], a) -> int:
    import importlib.metadata

    from salf.export.context import export_context
    from salf.method.plan import Plan

    salf_data, dataset_dir = _write_data(work)
    jobs, exports, contexts = [], {}, {}
    for name in names:
        model_type, overrides, how = CASES[name]
        case_dir = work / name
        case_dir.mkdir(exist_ok=True)
        folder = _save_model(case_dir / "model", model_type, overrides)
        plan_path = case_dir / "plan.json"
        if how[0] == "cli":
            _cli(["plan", "--model", str(folder), "--data", str(salf_data), "--policy", how[1], "--out", str(plan_path),
                  "--sample-size", "16", "--no-progress"])
        else:
            _hand_plan(folder, how[1], how[2]).save(plan_path)
        export_path = case_dir / "llamafactory.yaml"
        _cli(["export", str(plan_path), "--to", "llamafactory", "--model", str(folder), "--out", str(export_path)])
        exports[name] = export_path.read_text()
        contexts[name] = export_context(Plan.load(plan_path), model_path=str(folder))
        config = case_dir / "train.yaml"
        config.write_text(_train_config(exports[name], folder, dataset_dir, case_dir / "out", a.steps))
        jobs.append({"name": name, "config": str(config)})
    job_path = work / "job.json"
    job_path.write_text(json.dumps({"cases": jobs, "out": str(work / "tool.json")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DISABLE_VERSION_CHECK": "0", "WANDB_DISABLED": "true", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--in-tool", str(job_path)], cwd=work,
                          env=env, capture_output=True, text=True)
    (work / "tool.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (work / "tool.json").is_file():
        print(proc.stdout[-4000:] + proc.stderr[-8000:], file=sys.stderr)
        print(f"LLaMA-Factory's run failed (exit {proc.returncode}); log: {work / 'tool.log'}", file=sys.stderr)
        return 1
    tool = json.loads((work / "tool.json").read_text())
    results = [_compare(n, work / n, exports[n], contexts[n], tool["records"][n]) for n in names]
    salf_versions = {k: importlib.metadata.version(k) for k in ("salf", "transformers", "torch")}
    ok = all(not r["problems"] for r in results)
    print(f"LLaMA-Factory side: {', '.join(f'{k} {v}' for k, v in tool['versions'].items())}")
    print(f"salf side: {', '.join(f'{k} {v}' for k, v in salf_versions.items())}")
    for w in tool["workarounds"]:
        print(f"workaround: {w}")
    print(f"{a.steps} steps per case, {time.perf_counter() - t0:.0f} s in LLaMA-Factory\n")
    print(_table(results))
    report(results, ok, "LLaMA-Factory", "llamafactory", a.record, {
        "check": "scripts/check_export_llamafactory.py", "passed": ok, "steps": a.steps,
        "tool_versions": tool["versions"], "salf_side": salf_versions, "workarounds": tool["workarounds"]},
        drop=("plan", "trained", "error"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

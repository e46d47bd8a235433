"""Fine-tune with TRL's ``SFTTrainer`` and a salf plan: ``SalfCallback`` applies the plan.

``SalfCallback(plan.freeze_spec())`` in ``callbacks=`` is all it takes: it freezes the embeddings and the
blocks below the boundary when the trainer is built (before the optimizer, so the frozen parameters get no
optimizer state), runs that frozen prefix without autograd (backpropagation stops at the boundary), keeps
dropout off in frozen blocks, and measures the first step's FLOPs (``callback.sampled_flops``).

    python examples/trl_sft.py --model Qwen/Qwen2-0.5B --data train.jsonl --plan plan.json --out runs/trl

``--data`` is any file ``salf train`` reads: ``text``, ``prompt`` + ``completion``, or ``messages`` (a conversation,
rendered with the model's chat template). salf tokenizes it (``salf.data.encode.load_task_data``) and hands TRL
``input_ids`` with ``assistant_masks``, so TRL's loss covers exactly the tokens salf's would: the completion, or the
assistant turns, whether or not the template marks them for TRL. Any dataset ``SFTTrainer`` accepts works through
``sft_with_plan``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from salf.method.freeze import FreezeSpec
from salf.method.plan import Plan
from salf.training.callback import SalfCallback


def sft_with_plan(model: Any, tokenizer: Any, train_dataset: Any, spec: FreezeSpec, out_dir: str,
                  **sft_args: Any) -> tuple[Any, SalfCallback]:
    """Train ``model`` on ``train_dataset`` with TRL's ``SFTTrainer`` under the plan ``spec``.

    ``sft_args`` go to ``trl.SFTConfig`` (``max_steps``, ``per_device_train_batch_size``, ``learning_rate``, ...).
    Returns the trainer and the callback (``callback.report``: what was frozen; ``callback.sampled_flops``).
    """
    from trl import SFTConfig, SFTTrainer

    defaults: dict[str, Any] = dict(report_to=[], save_strategy="no", logging_steps=1, bf16=False)
    args = SFTConfig(output_dir=out_dir, **{**defaults, **sft_args})
    callback = SalfCallback(spec)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                         callbacks=[callback])
    trainer.train()
    return trainer, callback


def sft_dataset(path: str, tokenizer: Any, max_length: int = 512) -> Any:
    """A data file of any shape salf reads, as TRL's pre-tokenized rows: ``input_ids`` and ``assistant_masks``
    (1 where a token is a target: every token of plain text, the completion, the assistant turns)."""
    from datasets import Dataset

    from salf.data.batch import IGNORE_INDEX
    from salf.data.encode import load_task_data
    from salf.data.tasks import DataConfig

    data = load_task_data(path, tokenizer, DataConfig(max_length=max_length))
    if data.task == "classification":
        raise SystemExit("classification data: train it with `salf train`, or give the labels as words "
                         "(prompt/completion) for a causal LM")
    return Dataset.from_list([{"input_ids": d["input_ids"], "assistant_masks": [int(t != IGNORE_INDEX) for t in d["labels"]]}
                              for d in data.data])


def main(argv: Sequence[str] | None = None) -> None:
    from salf.method.plan import model_fingerprint
    from salf.models.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model the plan was made for (folder or hub name)")
    p.add_argument("--data", required=True, help="JSONL/Parquet file with 'text', 'prompt' + 'completion' or 'messages'")
    p.add_argument("--plan", required=True, help="plan.json written by `salf plan`")
    p.add_argument("--out", required=True, help="output directory of the trainer")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    a = p.parse_args(argv)

    plan = Plan.load(a.plan)
    loaded = load_model(a.model, "lm")
    plan.check_model(model_fingerprint(loaded.model))  # refuse a plan made for another model
    dataset = sft_dataset(a.data, loaded.tokenizer)
    _, callback = sft_with_plan(loaded.model, loaded.tokenizer, dataset, plan.freeze_spec(), a.out,
                                max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
                                learning_rate=a.learning_rate)
    report = callback.report
    print(f"trained {report.trainable_params} of {report.total_params} parameters; backward stopped at block "
          f"{report.prefix_blocks}; first step {callback.sampled_flops:.3g} FLOPs")


if __name__ == "__main__":
    main()

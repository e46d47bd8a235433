"""Does the evaluation pass's teacher-forced exact match equal greedy generation's on a trained model?

`salf.training.eval_metrics` scores a completion as exact when every completion token is the model's top
prediction given the true prefix; `salf.bench.measured.exact_match` generates greedily and compares
strings. Both are computed here on the same data:

    python scripts/check_exact_match.py MODEL_DIR EVAL_FILE [--label-mode words] [--max-length 96] [--n 200]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from salf.bench.measured import exact_match
from salf.commands.loading import load
from salf.config import DataConfig
from salf.config.commands import ModelSource
from salf.data.batch import collate
from salf.training.eval_metrics import completion_metrics, top_token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("eval_file")
    p.add_argument("--label-mode", default="head")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    loaded = load(ModelSource(a.model, a.eval_file), DataConfig(label_mode=a.label_mode, max_length=a.max_length))
    model, tokenizer, data = loaded.model.model.eval(), loaded.model.tokenizer, loaded.data.data[: a.n]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(d["input_ids"]) for d in data)  # one width for all batches, so they stack
    tops, labels = [], []
    with torch.no_grad():
        for i in range(0, len(data), a.batch):
            batch = collate(data[i: i + a.batch], pad)
            top = top_token(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, None)
            extra = width - top.shape[1]
            tops.append(torch.nn.functional.pad(top, (0, extra), value=-100))
            labels.append(torch.nn.functional.pad(batch["labels"], (0, extra), value=-100))
    forced = completion_metrics(SimpleNamespace(predictions=torch.cat(tops).numpy(), label_ids=torch.cat(labels).numpy()))
    generated = exact_match(model, tokenizer, data, a.batch)["exact_match"]
    print(f"{len(data)} data: teacher-forced exact match {forced['exact_match']:.4f} "
          f"(token accuracy {forced['token_accuracy']:.4f}), generated exact match {generated:.4f}")


if __name__ == "__main__":
    main()

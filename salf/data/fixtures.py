"""Benchmark fixture: a small GPT-style causal LM pretrained here on real local text.

No pretrained causal LM installs offline, so the causal-LM benchmark pretrains one: a GPT-2-shaped
model with a byte-level BPE tokenizer trained on Debian's package descriptions (real text nobody
here wrote), for a fixed number of steps (reproducible whatever else runs on the machine) or under a
wall-clock budget. It is cached: a finished fixture is reused, an interrupted one resumes from its last
checkpoint. Run it in the background:

    python -m salf.data.fixtures --out .salf-cache/gpt-debian --steps 800 --layers 6 --threads 1 > pretrain.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from salf.errors import SalfError
from salf.fileio import write_json

SPECIAL = ["<pad>", "<eos>", "<unk>"]


def debian_descriptions() -> list[str]:
    """Every package's description (short line + long text) from the local apt lists."""
    try:
        out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SalfError(f"cannot read Debian package lists ({e})", "run `apt-get update` first") from None
    texts, current = [], None
    for line in out.splitlines():
        if line.startswith("Description:"):
            current = [line[len("Description:"):].strip()]
        elif current is not None and line.startswith(" "):
            body = line.strip()
            current.append("" if body == "." else body)
        elif current is not None:
            texts.append("\n".join(current).strip())
            current = None
    if current:
        texts.append("\n".join(current).strip())
    texts = sorted(set(t for t in texts if len(t) > 40))
    if not texts:
        raise SalfError("the Debian package lists hold no descriptions", "run `apt-get update` first")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def _batches(ids: torch.Tensor, seq_len: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = (len(ids) - 1) // seq_len
    while True:
        for start in torch.randperm(n, generator=g).split(batch):
            if len(start) == batch:
                yield torch.stack([ids[s * seq_len:(s + 1) * seq_len] for s in start.tolist()])


@dataclass(frozen=True)
class PretrainBudget:
    """How long the fixture pretrains: a number of steps, a wall-clock time, or both (whichever comes first)."""

    steps: int | None = None
    """Training steps (reproducible whatever else runs on the machine); the cosine schedule spans them."""
    minutes: float | None = None
    """Wall-clock budget; without ``steps`` the schedule spans the steps the measured ~1.5k tokens/s would take."""

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise SalfError("the fixture needs a budget", "give --steps N (reproducible) or --minutes M")
        if self.steps is not None and self.steps < 0:
            raise SalfError(f"the fixture's step budget cannot be negative, got {self.steps}", "give --steps N >= 1")
        if self.minutes is not None and not self.minutes >= 0:
            raise SalfError(f"the fixture's time budget cannot be negative, got {self.minutes} minutes",
                            "give --minutes M > 0")


@dataclass(frozen=True)
class FixtureModel:
    """The shape of the GPT-2 fixture and its byte-level BPE tokenizer."""

    layers: int = 6
    """Number of GPT-2 blocks."""
    width: int = 256
    """Hidden size: a multiple of 64 (one attention head per 64 dimensions)."""
    vocab: int = 4096
    """Vocabulary size the tokenizer is trained to (special tokens included)."""

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise SalfError(f"the fixture needs at least one block, got {self.layers}", "give --layers N with N >= 1")
        if self.width < 64 or self.width % 64:
            raise SalfError(f"the fixture's width must be a positive multiple of 64, got {self.width}",
                            "give e.g. --width 256")
        if self.vocab < 1:
            raise SalfError(f"the fixture's vocabulary must be positive, got {self.vocab}")


def pretrain(out: Path, budget: PretrainBudget, model: FixtureModel = FixtureModel(), seq_len: int = 128,
             batch: int = 16, lr: float = 1e-3, seed: int = 0, threads: int | None = None) -> Path:
    """Pretrain for ``budget.steps`` steps (the cosine schedule spans them) or, without them, for
    ``budget.minutes`` of wall-clock time (the schedule spans the steps the measured ~1.5k tokens/s would
    take); both: whichever comes first. A finished fixture in ``out`` is returned as it is."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    steps, minutes = budget.steps, budget.minutes
    layers, width, vocab = model.layers, model.width, model.vocab
    out.mkdir(parents=True, exist_ok=True)
    final = out / "model"
    if (final / "config.json").exists():
        return final
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok_dir = out / "tokenizer"
    texts = debian_descriptions()
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir) if tok_dir.exists() else train_tokenizer(texts, vocab, tok_dir)
    ids_path = out / "ids.pt"
    if ids_path.exists():
        ids = torch.load(ids_path)
    else:
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([t for seq in enc for t in seq + [tok.eos_token_id]], dtype=torch.long)
        torch.save(ids, ids_path)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=width, n_layer=layers, n_head=width // 64,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gpt = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(gpt.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    state_path, step, spent = out / "state.pt", 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        gpt.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["seconds"]
    budget = math.inf if minutes is None else minutes * 60
    tokens_per_step = batch * seq_len
    # Schedule length: the step budget, else what the measured ~1.5k tokens/s gives in the time budget.
    est_steps = steps if steps is not None else max(1, int(budget * 1500 / tokens_per_step))
    gpt.train()
    t0, last_save = time.time() - spent, time.time()
    log = open(out / "progress.log", "a")
    for x in _batches(ids, seq_len, batch, seed + step):
        elapsed = time.time() - t0
        if elapsed > budget or (steps is not None and step >= steps):
            break
        frac = min(1.0, step / est_steps)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = gpt(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.3f} elapsed {elapsed:.0f}s/{budget:.0f}s "
                  f"tok/s {step * tokens_per_step / max(elapsed, 1):.0f}", file=log, flush=True)
        if time.time() - last_save > 120:
            tmp = out / "state.pt.tmp"
            torch.save({"model": gpt.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": elapsed}, tmp)
            tmp.replace(state_path)
            last_save = time.time()
    gpt.save_pretrained(final.with_suffix(".tmp"), safe_serialization=True)
    tok.save_pretrained(final.with_suffix(".tmp"))
    write_json(final.with_suffix(".tmp") / "pretrain.json",
               {"steps": step, "seconds": time.time() - t0, "final_loss": float(loss.item()), "layers": layers,
                "width": width, "vocab": len(tok), "seq_len": seq_len, "batch": batch, "corpus": "debian descriptions",
                "n_texts": len(texts), "n_tokens": int(len(ids))})
    final.with_suffix(".tmp").replace(final)
    return final


def main() -> None:
    p = argparse.ArgumentParser(description="Pretrain the causal-LM benchmark fixture on Debian descriptions.")
    p.add_argument("--out", type=Path, default=Path(".salf-cache/gpt-debian"), help="cache directory")
    p.add_argument("--steps", type=int, default=None, help="training steps (reproducible; default: use --minutes)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 40 without --steps)")
    p.add_argument("--layers", type=int, default=6, help="number of GPT-2 blocks")
    p.add_argument("--width", type=int, default=256, help="hidden size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args()
    minutes = 40.0 if a.minutes is None and a.steps is None else a.minutes
    path = pretrain(a.out, PretrainBudget(steps=a.steps, minutes=minutes),
                    FixtureModel(layers=a.layers, width=a.width), threads=a.threads)
    print(json.dumps({"model": str(path)}))


if __name__ == "__main__":
    main()

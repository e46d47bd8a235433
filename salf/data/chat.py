"""Conversational data: rows with a ``messages`` list of ``{"role", "content"}`` turns (TRL's format).

Each conversation is rendered with the model's own chat template and tokenized once; the targets are the
assistant turns only (their content and the end-of-turn token the template puts after it), every other
token is context (``IGNORE_INDEX``). The result is completion data (``salf.data.batch``), so the trace, the
plan, the cost model and training read it like prompt/completion data.

Where each assistant turn lies is found from the template itself, as a character span: the rendering of
the turns before it with the generation prompt ends where the answer begins, the rendering through it
ends where the turn ends. Both must be prefixes of the whole conversation's rendering (true of every
common template); a template that rewrites earlier turns when later ones are added is refused with that
reason. Tokens are mapped to characters through the fast tokenizer's offsets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from salf.data.batch import IGNORE_INDEX
from salf.data.files import quoted_rows
from salf.errors import SalfError

ROLES = ("system", "user", "assistant")


def check_messages(rows: list[dict], field_name: str, path: Path) -> list[list[dict[str, str]]]:
    """Every row's turns, checked: a non-empty list of {role, content} with known roles, a system turn only
    first, and at least one assistant turn (nothing to learn otherwise)."""
    problems: dict[str, list[int]] = {}
    conversations = []
    for number, row in enumerate(rows, start=1):
        turns = row.get(field_name)
        problem = _problem(turns)
        if problem:
            problems.setdefault(problem, []).append(number)
            continue
        conversations.append([{"role": t["role"], "content": t["content"]} for t in turns])
    if problems:
        listing = "; ".join(f"{what} (rows {quoted_rows(numbers)})" for what, numbers in problems.items())
        raise SalfError(
            f"{sum(map(len, problems.values()))} row(s) of {str(path)!r} have malformed {field_name!r}: {listing}",
            f"each row's {field_name!r} must be a list of {{\"role\": one of {', '.join(ROLES)}, \"content\": text}} "
            "with at least one assistant turn, and a system turn only first",
        )
    return conversations


def _problem(turns: Any) -> str | None:
    if not isinstance(turns, list) or not turns:
        return "not a non-empty list of turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return "a turn without text content"
        if turn.get("role") not in ROLES:
            return f"an unknown role {turn.get('role')!r}"
        if turn["role"] == "system" and i > 0:
            return "a system turn after the first"
    if not any(t["role"] == "assistant" for t in turns):
        return "no assistant turn"
    return None


def require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SalfError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so 'messages' data cannot be rendered",
            "use a chat (-Instruct) model whose tokenizer has one, set tokenizer.chat_template, or write the data "
            "as prompt/completion fields",
        )
    if not getattr(tokenizer, "is_fast", False):
        raise SalfError("'messages' data needs a fast tokenizer (character offsets locate the assistant turns)",
                        "load the model's tokenizer with use_fast=True")


def _render(tokenizer, turns: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn's answer (trailing
    whitespace after the end-of-turn marker left out: the model need not learn the newline between turns)."""
    text = _render(tokenizer, turns)
    spans = []
    for j, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, through = _render(tokenizer, turns[:j], generation_prompt=True), _render(tokenizer, turns[: j + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise SalfError(
                "the chat template renders a conversation's first turns differently once later turns follow, so "
                "the assistant turns cannot be located",
                "write the data as prompt/completion fields, rendered as you want them",
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def encode_conversation(tokenizer, turns: list[dict], limit: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): the template's rendering, cut to ``limit`` tokens from the end (the
    system prompt and the first question are kept), labels on the assistant answers' tokens only."""
    text, spans = assistant_spans(tokenizer, turns)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= lo and hi <= end and hi > lo for start, end in spans) else IGNORE_INDEX
        for token, (lo, hi) in zip(ids, encoded["offset_mapping"])
    ]
    cut = len(ids) > limit
    return ids[:limit], labels[:limit], cut


def messages_data(rows: list[dict], tokenizer, field_name: str, limit: int, path: Path) -> tuple[list[dict], list[int]]:
    """Conversations as completion data (targets on assistant tokens); the indices of truncated ones."""
    require_template(tokenizer)
    data, truncated, empty = [], [], []
    for number, turns in enumerate(check_messages(rows, field_name, path), start=1):
        ids, labels, cut = encode_conversation(tokenizer, turns, limit)
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
            empty.append(number)
            continue
        if cut:
            truncated.append(len(data))
        data.append({"input_ids": ids, "labels": labels})
    if empty:
        raise SalfError(
            f"{len(empty)} conversation(s) of {str(path)!r} have no assistant token within the max length "
            f"{limit} (rows {quoted_rows(empty)})",
            "raise --max-length, shorten the conversations, or give them a non-empty assistant answer",
        )
    return data, truncated


__all__ = ["ROLES", "assistant_spans", "check_messages", "encode_conversation", "messages_data", "require_template"]

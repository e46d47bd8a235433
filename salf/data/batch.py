"""The tokenized datum and batch format every stage shares.

A datum is a dict with ``input_ids`` (list of int) and ``labels``:
- language modelling and prompt/completion: a list of int aligned with ``input_ids``, -100 where
  the position is not a target (Hugging Face convention: the model shifts labels by one itself);
- classification by a head: one int, the class index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def collate(data: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of datums into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    if not data:
        raise ValueError("cannot collate an empty batch")
    width = max(len(d["input_ids"]) for d in data)
    ids = torch.full((len(data), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(data), width), dtype=torch.long)
    token_labels = not isinstance(data[0]["labels"], int)
    labels = torch.full((len(data), width), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for row, d in enumerate(data):
        n = len(d["input_ids"])
        ids[row, :n] = torch.as_tensor(d["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
        if labels is not None:
            labels[row, :n] = torch.as_tensor(d["labels"], dtype=torch.long)
    if labels is None:
        labels = torch.as_tensor([d["labels"] for d in data], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ListDataset(torch.utils.data.Dataset):
    """A list of datums as a ``Dataset`` (the Trainer wants one; ``datasets`` would copy to Arrow)."""

    def __init__(self, data: Sequence[dict]):
        self.data = list(data)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data[index]


class Collator:
    """Picklable collate function for ``DataLoader`` / ``Trainer`` (datasets columns -> tensors)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, data: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(data, self.pad_token_id)

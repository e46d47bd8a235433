"""What the evaluation pass of a run measures, per task (``EVAL_METRICS``): accuracy and macro F1 of a
classifier; teacher-forced token accuracy and exact match of a completion (plain text: its loss only).
"""

from __future__ import annotations

import numpy as np

from salf.data.batch import IGNORE_INDEX


def _predictions(eval_pred):
    """The model's first output (logits, or top token ids): some models return a tuple of outputs."""
    return eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions


def classification_metrics(eval_pred) -> dict[str, float]:
    logits = _predictions(eval_pred)
    labels = np.asarray(eval_pred.label_ids).reshape(-1)
    preds = np.asarray(logits).reshape(len(labels), -1).argmax(-1)
    f1s = []
    for cls in np.union1d(labels, preds):
        tp = np.sum((preds == cls) & (labels == cls))
        fp = np.sum((preds == cls) & (labels != cls))
        fn = np.sum((preds != cls) & (labels == cls))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s))}


def top_token(logits, labels):
    """Keep only each position's top token id, so evaluation gathers ids, not vocabulary-sized logits."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def completion_metrics(eval_pred) -> dict[str, float]:
    """Teacher-forced accuracy of the completion tokens, and the share of data whose every completion token
    is the top prediction given the true prefix: exactly the data whose greedy generation reproduces the
    completion, measured in the evaluation pass itself."""
    top = np.asarray(_predictions(eval_pred))
    labels = np.asarray(eval_pred.label_ids)
    predicted, target = top[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    scored = target != IGNORE_INDEX
    correct = (predicted == target) | ~scored
    has_target = scored.any(axis=1)
    return {"token_accuracy": float((predicted == target)[scored].mean()) if scored.any() else 0.0,
            "exact_match": float(correct.all(axis=1)[has_target].mean()) if has_target.any() else 0.0}


EVAL_METRICS = {"classification": classification_metrics, "completion": completion_metrics}
"""The metrics the evaluation pass computes per task (loss only for plain text)."""

"""Loading a model and a data file together, as ``salf trace | plan | train`` do."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from salf.config.commands import ModelSource
from salf.config.data import DataConfig
from salf.data.encode import load_task_data
from salf.data.tasks import TaskData
from salf.models.loading import LoadedModel, load_config, load_model, load_tokenizer


@dataclass
class ModelAndData:
    """A model with its tokenized data, loaded together so the label mapping matches the head."""

    model: LoadedModel
    data: TaskData
    config: DataConfig
    """How ``data`` was read; evaluation files are read the same way."""

    def load_eval(self, path: str | Path) -> TaskData:
        """Evaluation data read like the training data, with the training data's label mapping."""
        names = self.data.label_names if self.data.task == "classification" else None
        return load_task_data(path, self.model.tokenizer, replace(self.config, limit=None), label_names=names)


def load(source: ModelSource, config: DataConfig, label_names: list[str] | None = None) -> ModelAndData:
    """Tokenize ``source.data`` with the model's tokenizer, then load the model with a head for its task."""
    # Truncate to the model's positions, as load_model caps its own tokenizer: a saved tokenizer may
    # carry no limit (GPT-2 style), and longer sequences would overrun learned position embeddings.
    tokenizer = load_tokenizer(source.model, load_config(source.model, {}))
    task_data = load_task_data(source.data, tokenizer, config, label_names=label_names)
    names = task_data.label_names if task_data.task == "classification" else None
    loaded = load_model(source.model, task_data.task, label_names=names, head_pooling=source.classifier_pooling)
    return ModelAndData(loaded, task_data, config)

"""Apply a plan to a model: freeze what the plan leaves out and make backpropagation really stop.

Three things happen (METHOD.md section 5):

1. ``requires_grad`` is set once per parameter by one predicate over ``named_parameters`` and
   ``ModelParts.group_of``: embeddings, each block, the final norm and the head follow the
   ``FreezeSpec``; parameters outside those groups ('other') are trainable only in full fine-tuning.
2. The **frozen prefix** (the embeddings and every block below the lowest trainable block, when the
   embeddings are frozen) runs without building an autograd graph, so it stores no activations and
   the backward pass ends at the lowest trainable block. Forward pre-hooks on the prefix modules turn
   grad mode off; grad mode comes back at the end of the last frozen block (and, at the latest, at the
   input of the lowest trainable block), whose pre-hook also detaches every tensor it receives. That
   holds even when something made the embedding output require grad (``enable_input_require_grads``,
   which Hugging Face calls when gradient checkpointing is on and PEFT calls for adapters): the lowest
   trainable block never sees an input that requires grad, so it computes weight gradients only.
3. Frozen modules run in eval mode (dropout off) even though the HF ``Trainer`` calls
   ``model.train()`` before every step: each frozen module's pre-hook switches it back to eval.
   Frozen blocks *above* the lowest trainable one (non-contiguous plans) keep autograd, because the
   gradient of the trainable blocks below them flows through them, but their weights are frozen and
   their dropout is off.

Tied embeddings: where the output head shares its weight with the input embeddings (GPT-2's
``lm_head`` is ``wte``), the shared weight is one parameter and ``named_parameters`` lists it once,
under the embeddings. So a tied head is trained only when the embeddings are trainable; with
``embeddings=False`` the head keeps the pretrained vocabulary projection whatever ``head`` says,
unless the spec says ``untie_head``: ``apply_plan`` then gives the head its own copy of the matrix
(``salf.models.heads.untie_head``), which trains with the head while the embeddings stay frozen. The
untying is a change to the model, not a hook: ``remove()`` does not tie the matrices again.

``FreezeReport.remove()`` takes every hook off and restores each parameter's ``requires_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from salf.errors import SalfError
from salf.models.arch import ModelParts, find_parts
from salf.models.heads import untie_head

GROUPS_ORDER = ("embeddings", "block", "norm", "head", "other")


@dataclass(frozen=True)
class FreezeSpec:
    """Which parts of a model are trained; everything else is frozen."""

    trainable_blocks: tuple[int, ...]
    """0-based indices of the trainable blocks, sorted, without repeats; may be non-contiguous."""
    embeddings: bool
    """Train the input embeddings (and a head tied to them). False puts them in the no-grad prefix."""
    norm: bool = True
    """Train the final norm (ignored for models without one)."""
    head: bool = True
    """Train the output head (``lm_head``, ``score``, ``classifier`` and head extras such as BERT's pooler).
    A head tied to the input embeddings follows ``embeddings`` instead, unless ``untie_head``."""
    untie_head: bool = False
    """Give a head tied to the input embeddings its own trainable copy of the matrix (no-op when untied)."""

    def __post_init__(self) -> None:
        blocks = tuple(self.trainable_blocks)
        if any(not isinstance(b, int) or isinstance(b, bool) for b in blocks):
            raise SalfError(
                f"trainable_blocks must be block indices (int), got {blocks!r}",
                "pass 0-based integer block indices, e.g. (4, 5, 6, 7)",
            )
        if any(b < 0 for b in blocks):
            raise SalfError(f"trainable_blocks has a negative index: {blocks!r}", "block indices start at 0")
        if list(blocks) != sorted(set(blocks)):
            raise SalfError(
                f"trainable_blocks must be sorted and without repeats, got {blocks!r}",
                f"use {tuple(sorted(set(blocks)))!r}",
            )
        object.__setattr__(self, "trainable_blocks", blocks)

    @classmethod
    def full(cls, num_layers: int) -> FreezeSpec:
        """Full fine-tuning: every block, the embeddings, the norm and the head."""
        return cls.from_boundary(0, num_layers)

    @classmethod
    def from_boundary(cls, k: int, num_layers: int) -> FreezeSpec:
        """Boundary ``k`` = index of the first trainable block (METHOD.md section 4).

        ``k = 0`` is full fine-tuning (embeddings included); ``k > 0`` freezes the embeddings and blocks
        ``0..k-1`` and trains blocks ``k..L-1``, the norm and the head; ``k = L`` trains the norm and
        head only.
        """
        if num_layers < 1:
            raise SalfError(f"num_layers must be at least 1, got {num_layers}")
        if not 0 <= k <= num_layers:
            raise SalfError(
                f"boundary {k} is outside 0..{num_layers} for a model with {num_layers} blocks",
                f"pick a boundary between 0 (full fine-tuning) and {num_layers} (head only)",
            )
        return cls(trainable_blocks=tuple(range(k, num_layers)), embeddings=(k == 0))

    @property
    def lowest(self) -> int | None:
        """The lowest trainable block (where backpropagation stops), or None when no block is trained."""
        return self.trainable_blocks[0] if self.trainable_blocks else None

    def is_full(self, num_layers: int) -> bool:
        """True when every part of an ``num_layers``-block model is trained."""
        return (
            self.embeddings and self.norm and self.head and self.trainable_blocks == tuple(range(num_layers))
        )

    def to_dict(self) -> dict[str, Any]:
        data = {
            "trainable_blocks": list(self.trainable_blocks),
            "embeddings": self.embeddings,
            "norm": self.norm,
            "head": self.head,
        }
        if self.untie_head:  # only when set: specs (and the fingerprints made of them) stay as they were
            data["untie_head"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FreezeSpec:
        try:
            return cls(
                trainable_blocks=tuple(int(b) for b in data["trainable_blocks"]),
                embeddings=bool(data["embeddings"]),
                norm=bool(data.get("norm", True)),
                head=bool(data.get("head", True)),
                untie_head=bool(data.get("untie_head", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SalfError(
                f"not a freeze spec: {data!r} ({exc})",
                "a spec has trainable_blocks (list of int), embeddings, norm and head (bool)",
            ) from exc


@dataclass
class _GradWindow:
    """Grad mode saved when the no-grad prefix starts, restored when it ends (or the forward fails)."""

    saved: bool | None = None

    def close(self) -> None:
        if self.saved is not None:
            torch._C._set_grad_enabled(self.saved)
            self.saved = None


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.requires_grad else obj
    if isinstance(obj, tuple):
        items = [_detach(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):  # ModelOutput and plain dicts: replace values in place
        for key in list(obj.keys()):
            obj[key] = _detach(obj[key])
        return obj
    return obj


def _eval_pre_hook(module: nn.Module, args: Any) -> None:
    if module.training:
        module.eval()


@dataclass
class FreezeReport:
    """What ``apply_plan`` did to a model, and the handles to undo it."""

    spec: FreezeSpec
    num_layers: int
    trainable_params: int
    """Number of scalar parameters with ``requires_grad`` after the plan (tied weights counted once)."""
    total_params: int
    groups: dict[str, tuple[int, int]]
    """Per group ('embeddings', 'block:<i>', 'norm', 'head', 'other'): (trainable, total) parameter counts."""
    prefix_blocks: int
    """Blocks in the no-grad prefix (backpropagation stops at this block index); 0 when the embeddings are
    trained or (with adapters) have trainable parameters."""
    no_grad_modules: list[str]
    """Dotted names of the modules that run without autograd (the frozen prefix)."""
    eval_modules: list[str]
    """Dotted names of the frozen modules kept in eval mode (dropout off) during training."""
    only_freeze: bool
    """True when the plan only froze parameters and never unfroze any (adapter models such as PEFT's)."""
    _model: nn.Module = field(repr=False, default=None)
    _handles: list[Any] = field(repr=False, default_factory=list)
    _saved_requires_grad: list[tuple[nn.Parameter, bool]] = field(repr=False, default_factory=list)
    _eval_module_objs: list[nn.Module] = field(repr=False, default_factory=list)
    removed: bool = False

    def __post_init__(self) -> None:
        if self.trainable_params < 0 or self.total_params < self.trainable_params:
            raise ValueError(f"inconsistent parameter counts {self.trainable_params}/{self.total_params}")

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "num_layers": self.num_layers,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_fraction": self.trainable_fraction,
            "prefix_blocks": self.prefix_blocks,
            "groups": {name: {"trainable": t, "total": n} for name, (t, n) in self.groups.items()},
            "no_grad_modules": list(self.no_grad_modules),
            "eval_modules": list(self.eval_modules),
            "only_freeze": self.only_freeze,
        }

    def remove(self) -> None:
        """Take the hooks off and restore every parameter's ``requires_grad`` and the modules' train mode."""
        if self.removed:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._saved_requires_grad:
            param.requires_grad_(flag)
        self._saved_requires_grad.clear()
        if self._model is not None:
            for module in self._eval_module_objs:
                module.train(self._model.training)
            if getattr(self._model, "_salf_freeze", None) is self:
                del self._model._salf_freeze
        self._eval_module_objs.clear()
        self.removed = True


def _is_adapter_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _inner_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside an adapter wrapper (PEFT), or the model itself."""
    return model.get_base_model() if _is_adapter_model(model) else model


def applied_report(model: nn.Module) -> FreezeReport | None:
    """The live ``FreezeReport`` of a model ``apply_plan`` was called on, or None."""
    report = getattr(_inner_model(model), "_salf_freeze", None)
    return report if isinstance(report, FreezeReport) and not report.removed else None


def _block_index(group: str) -> int | None:
    return int(group.split(":", 1)[1]) if group.startswith("block:") else None


def _wants_grad(spec: FreezeSpec, group: str, full: bool) -> bool:
    if group == "embeddings":
        return spec.embeddings
    if group == "norm":
        return spec.norm
    if group == "head":
        return spec.head
    index = _block_index(group)
    if index is not None:
        return index in spec.trainable_blocks
    return full  # 'other': trainable only in full fine-tuning


def _group_sort_key(name: str) -> tuple[int, int]:
    index = _block_index(name)
    if index is not None:
        return (GROUPS_ORDER.index("block"), index)
    return (GROUPS_ORDER.index(name) if name in GROUPS_ORDER else len(GROUPS_ORDER), 0)


def apply_plan(
    model: nn.Module,
    spec: FreezeSpec,
    *,
    parts: ModelParts | None = None,
    only_freeze: bool | None = None,
) -> FreezeReport:
    """Freeze ``model`` according to ``spec``; returns a report whose ``remove()`` undoes it.

    ``only_freeze``: never switch ``requires_grad`` on, only off (default: True for PEFT adapter models,
    whose adapters decide what is trainable inside the planned blocks). A model that already carries a
    plan has it removed first.
    """
    previous = applied_report(model)
    if previous is not None:
        previous.remove()
    inner = _inner_model(model)
    if only_freeze is None:
        only_freeze = _is_adapter_model(model)
    parts = parts if parts is not None else find_parts(inner)
    num_layers = parts.num_layers
    if spec.trainable_blocks and spec.trainable_blocks[-1] >= num_layers:
        raise SalfError(
            f"the plan trains block {spec.trainable_blocks[-1]} but the model has {num_layers} blocks (0..{num_layers - 1})",
            "make the plan for this model (check the model name and the plan file)",
        )
    if spec.untie_head:
        untie_head(inner)  # before the groups are counted: the untied head is a parameter of its own
    full = spec.is_full(num_layers)

    # 1. requires_grad, by one predicate over named_parameters.
    saved: list[tuple[nn.Parameter, bool]] = []
    counts: dict[str, list[int]] = {}
    trainable = total = 0
    for name, param in inner.named_parameters():
        group = parts.group_of(name)
        saved.append((param, param.requires_grad))
        flag = _wants_grad(spec, group, full)
        if only_freeze:
            flag = flag and param.requires_grad
        param.requires_grad_(flag)
        n = param.numel()
        entry = counts.setdefault(group, [0, 0])
        entry[1] += n
        total += n
        if flag:
            entry[0] += n
            trainable += n
    groups = {g: (counts[g][0], counts[g][1]) for g in sorted(counts, key=_group_sort_key)}

    # 2. The no-grad prefix: leading pipeline stages without one trainable parameter.
    def stage_trainable(group: str) -> bool:
        return groups.get(group, (0, 0))[0] > 0

    names = {id(m): n for n, m in inner.named_modules()}
    handles: list[Any] = []
    eval_objs: list[nn.Module] = []
    no_grad_names: list[str] = []
    prefix_blocks = 0
    prefix_active = not stage_trainable("embeddings") and not stage_trainable("other")
    if prefix_active:
        while prefix_blocks < num_layers and not stage_trainable(f"block:{prefix_blocks}"):
            prefix_blocks += 1
        window = _GradWindow()

        def no_grad_pre_hook(module: nn.Module, args: Any) -> None:
            if module.training:
                module.eval()
            if window.saved is None:
                window.saved = torch.is_grad_enabled()
                torch._C._set_grad_enabled(False)

        def end_of_prefix_hook(module: nn.Module, args: Any, output: Any) -> Any:
            window.close()
            return _detach(output)

        def lowest_block_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            window.close()
            return _detach(args), _detach(kwargs)

        def guard_hook(module: nn.Module, args: Any, output: Any) -> None:
            window.close()  # a forward that raised or skipped the blocks must not leave grad mode off

        prefix_modules: list[nn.Module] = list(parts.embeddings.values())
        base = inner.get_submodule(parts.base_prefix) if parts.base_prefix else inner
        # Dropout applied right to the embeddings' output (GPT-2's ``drop``) belongs to the prefix too.
        prefix_modules += [m for m in base.children() if isinstance(m, nn.Dropout)]
        prefix_modules += list(parts.blocks[:prefix_blocks])
        for module in prefix_modules:
            handles.append(module.register_forward_pre_hook(no_grad_pre_hook))
            no_grad_names.append(names.get(id(module), type(module).__name__))
            eval_objs.append(module)
        if prefix_blocks > 0:
            handles.append(parts.blocks[prefix_blocks - 1].register_forward_hook(end_of_prefix_hook))
        if prefix_blocks < num_layers:
            handles.append(
                parts.blocks[prefix_blocks].register_forward_pre_hook(lowest_block_pre_hook, with_kwargs=True)
            )
        for module in {id(m): m for m in (inner, base)}.values():
            handles.append(module.register_forward_hook(guard_hook, always_call=True))

    # 3. Frozen blocks outside the prefix (and a frozen norm) keep autograd but run in eval mode.
    frozen_rest: list[nn.Module] = [
        block
        for i, block in enumerate(parts.blocks)
        if i >= prefix_blocks and not stage_trainable(f"block:{i}")
    ]
    if not prefix_active:
        frozen_rest = [block for i, block in enumerate(parts.blocks) if not stage_trainable(f"block:{i}")]
    if parts.norm is not None and not stage_trainable("norm"):
        frozen_rest.append(parts.norm)
    for module in frozen_rest:
        handles.append(module.register_forward_pre_hook(_eval_pre_hook))
        eval_objs.append(module)

    report = FreezeReport(
        spec=spec,
        num_layers=num_layers,
        trainable_params=trainable,
        total_params=total,
        groups=groups,
        prefix_blocks=prefix_blocks if prefix_active else 0,
        no_grad_modules=no_grad_names,
        eval_modules=[names.get(id(m), type(m).__name__) for m in eval_objs],
        only_freeze=only_freeze,
        _model=inner,
        _handles=handles,
        _saved_requires_grad=saved,
        _eval_module_objs=eval_objs,
    )
    inner._salf_freeze = report
    return report

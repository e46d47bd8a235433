"""PNG figures of a plan: the trace with its fitted depth law, the gains, the cost-benefit curve."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from salf.fileio import write_atomic  # noqa: E402
from salf.method.gain import DepthFit  # noqa: E402
from salf.method.plan import Plan  # noqa: E402


def _draw_trace(ax, plan: Plan) -> None:
    layers = np.arange(plan.num_layers + 1)
    trace, std = np.asarray(plan.trace), np.asarray(plan.trace_std)
    ax.plot(layers, trace, "o-", color="C0", label=f"deviation ({plan.lens})")
    ax.fill_between(layers, trace - std, trace + std, color="C0", alpha=0.15, label="±1 std over data")
    fit = DepthFit.from_dict(plan.fit)
    fine = np.linspace(0, plan.num_layers, 200)
    ax.plot(fine, fit.predict(fine), "--", color="C1", label=f"depth law fit (R²={fit.r2:.2f})")
    ax.axvline(plan.boundary, color="C3", lw=1, ls=":", label=f"boundary k={plan.boundary}")
    ax.set_xlabel("latent space l (0 = embeddings)")
    ax.set_ylabel("deviation")
    ax.set_title("Transition trace")
    ax.legend(fontsize=7)


def _draw_gains(ax, plan: Plan) -> None:
    gains = np.asarray(plan.gains)
    colors = ["C2" if j >= plan.boundary else "0.7" for j in range(plan.num_layers)]
    ax.bar(np.arange(plan.num_layers), gains, color=colors)
    ax.set_xlabel("block (green: trained, grey: frozen)")
    ax.set_ylabel("estimated gain")
    ax.set_title(f"Gain per block ({plan.estimator})")


def _draw_tradeoff(ax, plan: Plan) -> None:
    cost, benefit = np.asarray(plan.cost), np.asarray(plan.benefit)
    ax.plot(cost, benefit, "o-", color="C0")
    for k, (c, b) in enumerate(zip(cost, benefit)):
        ax.annotate(str(k), (c, b), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.plot([cost[plan.boundary]], [benefit[plan.boundary]], "*", ms=16, color="C3", label=f"plan k={plan.boundary} ({plan.policy})")
    ax.set_xlabel("step cost / full fine-tuning")
    ax.set_ylabel("share of gain trained")
    ax.set_title("Cost-benefit (labels: boundary k)")
    ax.legend(fontsize=7, loc="lower right")


def plan_figure_png(plan: Plan) -> bytes:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _draw_trace(axes[0], plan)
    _draw_gains(axes[1], plan)
    _draw_tradeoff(axes[2], plan)
    name = plan.model.get("name_or_path") or plan.model.get("model_type", "model")
    if "/" in name and Path(name).is_absolute():  # a local folder: its last two parts say enough
        name = "/".join(Path(name).parts[-2:])
    fig.suptitle(f"salf plan for {name}: train blocks {plan.boundary}..{plan.num_layers - 1}, "
                 f"predicted step cost {plan.predicted.step_flops_ratio:.2f}x full")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_plan(plan: Plan, path: str | Path) -> Path:
    return write_atomic(path, plan_figure_png(plan))

"""The report's figures as PNG bytes: the plan (``salf.report.plan_figure``), the training curves against
step and against FLOPs, and predicted against measured savings.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from salf.method.plan import Plan
from salf.report.runs import Run, Saving, finite


# Figures
def png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plan_figures(plan: Plan) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the trace with its fit, the gains and the cost-benefit curve."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from salf.report.plan_figure import _draw_gains, _draw_trace, _draw_tradeoff

    out = []
    for caption, draw in (
        ("Deviation of each latent space from the targets, with the fitted depth law "
         "D(l) = E∞ + A·(l+1)^-α; the dotted line is the boundary.", _draw_trace),
        ("Estimated gain of each block; green blocks are trained, grey ones frozen.", _draw_gains),
        ("Share of the gain trained against step cost for every boundary k; the star is the plan.", _draw_tradeoff),
    ):
        fig, ax = plt.subplots(figsize=(4.8, 3.4))
        draw(ax, plan)
        if draw is _draw_gains:  # blocks are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # The figures are shown a third of the page wide: labels must stay readable there.
        legend = ax.get_legend()
        for text in [*ax.texts, *(legend.get_texts() if legend else [])]:
            text.set_fontsize(8)
        fig.tight_layout()
        out.append((caption, png(fig)))
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def curves_figure(runs: Sequence[Run]) -> str | None:
    """Training loss against step (and against cumulative training FLOPs where measured), one line per run."""
    fig = draw_curves(runs)
    return png(fig) if fig is not None else None


def draw_curves(runs: Sequence[Run]):
    """The matplotlib figure behind ``curves_figure`` (None when no run has a loss history)."""
    import matplotlib.pyplot as plt

    with_history = [r for r in runs if any(finite(h.get("loss")) for h in r.history)]
    if not with_history:
        return None
    by_flops = all(finite(r.metrics.get("flops_per_padded_token")) for r in with_history)
    fig, axes = plt.subplots(1, 2 if by_flops else 1, figsize=(11 if by_flops else 6.5, 3.8), squeeze=False)
    for i, run in enumerate(with_history):
        points = [(h["step"], float(h["loss"]), int(h.get("tokens", 0) or 0)) for h in run.history if finite(h.get("loss"))]
        steps = [p[0] for p in points]
        losses = [p[1] for p in points]
        color = f"C{i % 10}"
        per_token = run.metrics.get("flops_per_padded_token")
        xs = [(steps, axes[0][0])]
        if by_flops:
            cumulative, total = [], 0
            for p in points:
                total += p[2]
                cumulative.append(total * float(per_token))
            xs.append((cumulative, axes[0][1]))
        window = max(1, len(losses) // 25)
        for x, ax in xs:
            if window > 1:
                ax.plot(x, losses, color=color, alpha=0.25, lw=0.8)
                ax.plot(x, _smooth(losses, window), color=color, lw=1.8, label=f"{run.label} (mean of {window})")
            else:
                ax.plot(x, losses, "o-", color=color, ms=3, lw=1.5, label=run.label)
        evals = [(h.get("step"), h.get("eval_loss")) for h in run.metrics.get("eval_history") or []]
        evals = [(s, v) for s, v in evals if finite(s) and finite(v)]
        if evals:
            axes[0][0].plot(*zip(*evals), "s", color=color, ms=7, mfc="white", mew=1.5, label=f"{run.name} eval loss")
    axes[0][0].set_xlabel("optimizer step")
    axes[0][0].set_title("Training loss by step")
    if by_flops:
        axes[0][1].set_xlabel("training FLOPs (measured per token × tokens)")
        axes[0][1].set_title("Training loss by compute")
    for ax in axes[0]:
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def savings_figure(savings: Sequence[Saving]) -> str | None:
    """Grouped bars: predicted step FLOPs vs measured FLOPs/token, training FLOPs and step time, × full."""
    import matplotlib.pyplot as plt
    import numpy as np

    series = [
        ("predicted step FLOPs", "predicted_step_flops", "C0"),
        ("measured FLOPs per token", "measured_flops_per_token", "C2"),
        ("measured training FLOPs", "measured_train_flops", "C4"),
        ("measured step time", "measured_step_time", "C1"),
    ]
    series = [s for s in series if any(getattr(row, s[1]) is not None for row in savings)]
    if not savings or not series:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, 3.0 + 2.2 * len(savings)), 3.6))
    width = 0.8 / len(series)
    x = np.arange(len(savings))
    for j, (label, attr, color) in enumerate(series):
        values = [getattr(row, attr) for row in savings]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, heights, width, label=label, color=color)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="0.3", lw=1, ls="--", label="full fine-tuning")
    ax.set_xticks(x, [f"{row.run} (k={row.boundary})" for row in savings], fontsize=8)
    ax.set_ylabel("cost × full fine-tuning")
    ax.set_title("Predicted vs measured cost")
    ax.set_ylim(0, max(1.0, *(getattr(r, a) or 0 for r in savings for _, a, _ in series)) * 1.45)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    return png(fig)


__all__ = ["curves_figure", "draw_curves", "plan_figures", "savings_figure"]

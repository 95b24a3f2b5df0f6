"""Figures of the perfusion evaluation (matplotlib, imported here only, Agg backend)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_difficulty_curve(curve: dict, path, *, title: str = "") -> None:
    """Accuracy and ROC AUC (normal vs abnormal) and ischemia-vs-infarction accuracy against
    defect depth, one line per method (PNG)."""
    plt = _pyplot()
    depths = 100 * np.asarray(curve["depths"])
    panels = (
        ("abnormal_accuracy", "normal vs abnormal: accuracy"),
        ("abnormal_auc", "normal vs abnormal: ROC AUC"),
        ("ischemia_vs_infarction_accuracy", "ischemia vs infarction: accuracy"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method, row in curve.items():
            if method not in ("depths", "folders"):
                ax.plot(depths, row[key], marker="o", label=method)
        ax.set_xlabel("defect depth (% of the hottest uptake lost)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(metrics: dict[str, dict], path, *, title: str = "") -> None:
    """Reliability diagrams and abstention curves of `evaluation.evaluate_report` metrics, one
    line per held-out set (name -> metrics), for both tasks (PNG)."""
    plt = _pyplot()
    tasks = (
        ("abnormal", "normal vs abnormal"),
        ("ischemia_vs_infarction", "ischemia vs infarction"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
    for col, (task, label) in enumerate(tasks):
        rel, ab = axes[0, col], axes[1, col]
        rel.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for name, m in metrics.items():
            c = m["calibration"][task]
            bins = zip(
                c["reliability"]["mean_predicted"],
                c["reliability"]["observed"],
                c["reliability"]["count"],
                strict=True,
            )
            pts = [(p, o, n) for p, o, n in bins if p is not None]
            if pts:
                px, oy, n = zip(*pts, strict=True)
                (line,) = rel.plot(px, oy, label=f"{name} (ECE {c['ece']:.3f})")
                # marker area grows with the studies in the bin: sparse bins are noisy
                rel.scatter(px, oy, s=8 + 4 * np.sqrt(n), color=line.get_color())
            curve = [
                (a["abstention_rate"], a["accuracy"])
                for a in c["abstention"]
                if a["accuracy"] is not None
            ]
            ab.plot(*zip(*curve, strict=True), marker=".", label=name)
        rel.set_title(f"{label}: reliability (marker area ~ studies)", fontsize=10)
        rel.set_xlabel("predicted probability")
        rel.set_ylabel("observed frequency")
        rel.legend(fontsize=8)
        ab.set_title(f"{label}: abstention (band 0.5 +- w, w = 0 ... 0.45)", fontsize=10)
        ab.set_xlabel("share of studies left to the reader")
        ab.set_ylabel("accuracy on the rest")
        for ax in (rel, ab):
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

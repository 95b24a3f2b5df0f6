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


def roc_curve(score, positive) -> tuple[np.ndarray, np.ndarray]:
    """(1 - specificity, sensitivity) of the call score >= t at every distinct score, from
    (0, 0) (nothing called) to (1, 1)."""
    from perfusion import operating_point

    score = np.asarray(score, np.float64).ravel()
    cuts = np.concatenate([[np.inf], np.unique(score)[::-1]])
    sens, spec = operating_point.sensitivity_specificity(score, np.asarray(positive).ravel(), cuts)
    return 1.0 - spec, sens


def plot_roc(sets: dict[str, dict], path, *, title: str = "") -> None:
    """Per-patient (normal vs abnormal; whole, and the corner where the calls lie) and
    per-vessel (LAD, LCX, RCA pooled) ROC curves, one colour per set of studies (name ->
    `evaluation.roc_inputs`, optionally with "fit_point": the out-of-fold (sensitivity,
    specificity) the fit chose its threshold for); the model's calls marked, stress TPD and
    the summed stress score dotted (PNG)."""
    from perfusion import evaluation

    plt = _pyplot()
    fig, (whole, corner, vessel) = plt.subplots(1, 3, figsize=(16, 5.4))
    corner_x, corner_y = 0.2, 0.8  # widened to hold every call
    for name, s in sets.items():
        y, terr = s["abnormal"], s["territories"]
        curves = [((whole, corner), s["abnormal_probability"], y, "-", name)]
        curves.append(((whole, corner), s["tpd_stress"], y, ":", f"{name}, stress TPD alone"))
        if s["territory_probability"] is not None:
            curves.append(((vessel,), s["territory_probability"], terr, "-", name))
        curves.append(((vessel,), s["territory_sss"], terr, ":", f"{name}, summed stress score"))
        color = None
        for axes, score, positive, style, label in curves:
            auc = evaluation.roc_auc(score, positive)
            for ax in axes:
                (line,) = ax.plot(
                    *roc_curve(score, positive), ls=style, color=color, lw=1.4,
                    label=f"{label} (AUC {auc:.3f})",
                )  # fmt: skip
                color = line.get_color()
        called = s["called"]
        sens, spec = called[y].mean(), (~called[~y]).mean()
        corner_x, corner_y = max(corner_x, 1.5 * (1 - spec)), min(corner_y, sens - 0.05)
        for ax in (whole, corner):
            ax.plot(1 - spec, sens, "o", ms=8, color=color, mec="black",
                    label=f"{name}: calls, sensitivity {sens:.3f}, specificity {spec:.3f}"
                    if ax is corner else None)  # fmt: skip
        if s.get("fit_point"):
            fit_sens, fit_spec = s["fit_point"]
            corner.plot(1 - fit_spec, fit_sens, "*", ms=13, color=color, mec="black",
                        label=f"its threshold's out-of-fold choice, {fit_sens:.3f} / "
                        f"{fit_spec:.3f}")  # fmt: skip
    whole.set_title("per patient, normal vs abnormal", fontsize=10)
    corner.set_title("the same, top left corner (o the calls)", fontsize=10)
    vessel.set_title("per vessel, LAD, LCX and RCA pooled", fontsize=10)
    corner.set_xlim(-0.005, corner_x)
    corner.set_ylim(corner_y, 1.005)
    for ax in (whole, corner, vessel):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

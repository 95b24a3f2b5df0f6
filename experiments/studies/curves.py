"""Learning curves of training variants at equal budget, scored on held-out patients.

Each variant (a name and config overrides: head, loss, input size...) trains once in its own
workdir with validation every `eval_every` steps; the validation passes that training makes
anyway (held-out patients of the training project, threshold 0.5, no tuning) are read back
from the TensorBoard events as the curve, against steps and wall-clock seconds. At the end,
thresholds are tuned on those validation patients and each held-out project (other seeds,
frame sizes, case mixes) is scored with tuned thresholds and with 0.5, with the calibration
of the visibility probabilities on validation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cardiac_core.fileio import atomic_write_with, write_json_atomic
from experiments.studies.table1 import case_counts
from tavr_jax.config import apply_overrides
from tavr_jax.infer.evaluate import evaluate_project, tune_project
from tavr_jax.metrics import paired_bootstrap_f1
from tavr_jax.training.train import read_scalars

CURVE_TAGS = ("val_f1", "val_precision", "val_recall", "val_mean_error_px", "val_loc_accuracy_20px")
SUMMARY_KEYS = ("precision", "recall", "f1", "mean_error_px", "loc_accuracy_20px")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One curve: a name and the config fields it changes (dotted names, e.g. `loss.x`)."""

    name: str
    overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)


def _summary(metrics: dict) -> dict:
    keep = {k: metrics.get(k) for k in SUMMARY_KEYS}
    width = metrics.get("frame_width_px")
    err = metrics.get("mean_error_px")
    keep["mean_error_px_at_1024"] = None if err is None or not width else err * 1024.0 / width
    keep["frame_width_px"] = width
    keep["n_images"] = metrics.get("n_images")
    return keep


def run_curves(
    base_config,
    data_dir,
    variants: Sequence[Variant],
    *,
    workdir_root,
    test_projects: Mapping[str, str] | None = None,
    steps: int,
    eval_every: int,
    out=None,
    train_fn: Callable | None = None,
    eval_batch_size: int = 16,
) -> dict:
    """Trains each variant (resumed when its workdir has a finished run) and scores it.

    Returns (and writes to `out` as JSON after each variant) {variant name: {"overrides",
    "curve": {tag: [[step, seconds, value], ...]}, "train_seconds", "val": {...,
    "calibration"}, "test": {project: {"tuned": summary, "at_0.5": summary,
    "case_counts_at_0.5": {case: [TP, FP, FN]}}}}}.
    """
    if train_fn is None:
        from tavr_jax.training.train import train_and_evaluate as train_fn
    results: dict = {}
    for v in variants:
        config = apply_overrides(base_config, v.overrides)
        config.num_steps = int(steps)
        config.eval_every = config.checkpoint_every = int(eval_every)
        workdir = pathlib.Path(workdir_root) / v.name
        done = workdir / "curve.json"
        if done.exists() and json.loads(done.read_text()).get("steps") == steps:
            results[v.name] = json.loads(done.read_text())
        else:
            t0 = time.perf_counter()
            final = train_fn(config, workdir, data_dir)
            train_seconds = time.perf_counter() - t0
            scalars = read_scalars(workdir)
            tuned = tune_project(workdir, data_dir, batch_size=eval_batch_size, which="latest")
            val = evaluate_project(
                workdir, data_dir, split="val", threshold=0.5, batch_size=eval_batch_size,
                which="latest",
            )  # fmt: skip
            entry = {
                "overrides": dict(v.overrides),
                "steps": steps,
                "train_seconds": train_seconds,
                "stopped": final.get("stopped"),
                "curve": {t: scalars.get(t, []) for t in CURVE_TAGS},
                "val": {
                    "at_0.5": _summary(val),
                    "calibration": val["visibility_calibration"],
                    "tuned_val_f1": tuned["val_f1"],
                },
                "test": {},
            }
            for name, project in (test_projects or {}).items():
                score = functools.partial(
                    evaluate_project, workdir, project, split="all", which="latest",
                    batch_size=eval_batch_size,
                )  # fmt: skip
                counts = case_counts(workdir, project, split="all", threshold=0.5,
                                     which="latest", batch_size=eval_batch_size)  # fmt: skip
                entry["test"][name] = {
                    "tuned": _summary(score()),
                    "at_0.5": _summary(score(threshold=0.5)),
                    "case_counts_at_0.5": counts,
                }
            write_json_atomic(done, entry)
            results[v.name] = json.loads(done.read_text())  # as a resumed run will see it
        if out is not None:
            write_json_atomic(out, results)
    return results


def compare_variants(results: Mapping[str, dict], a: str, b: str, **bootstrap) -> dict:
    """F1(a) - F1(b) at threshold 0.5 on each held-out project, with a paired bootstrap
    interval over its patients (`metrics.paired_bootstrap_f1`)."""
    out = {}
    for project, scores in results[a]["test"].items():
        out[project] = paired_bootstrap_f1(
            scores["case_counts_at_0.5"],
            results[b]["test"][project]["case_counts_at_0.5"],
            **bootstrap,
        )
    return out


def plot_curves(results: Mapping[str, dict], path, *, frame_width_px: float | None = None) -> None:
    """Mean error and F1 (validation, threshold 0.5) against steps and against seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    scale = 1024.0 / frame_width_px if frame_width_px else 1.0
    unit = "mean error (px at 1024)" if frame_width_px else "mean error (px)"
    for name, entry in results.items():
        for row, (tag, label, k) in enumerate(
            (("val_mean_error_px", unit, scale), ("val_f1", "F1 at threshold 0.5", 1.0))
        ):
            points = np.asarray(entry["curve"].get(tag) or np.zeros((0, 3)), np.float64)
            if not len(points):
                continue
            for col, x in enumerate((points[:, 0], points[:, 1] / 60.0)):
                axes[row, col].plot(x, points[:, 2] * k, marker="o", ms=3, label=name)
                axes[row, col].set_ylabel(label)
    for row in range(2):
        axes[row, 0].set_xlabel("training step")
        axes[row, 1].set_xlabel("wall-clock minutes (compile and validation included)")
        for col in range(2):
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    atomic_write_with(pathlib.Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_reliability(results: Mapping[str, dict], path) -> None:
    """Reliability diagram of each variant's validation visibility probabilities (marker
    area proportional to the share of points in the bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    for name, entry in results.items():
        cal = entry["val"]["calibration"]
        bins = [b for b in cal["bins"] if b["count"] > 0]
        x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        (line,) = ax.plot(x, y, lw=1, label=f"{name} (ECE {cal['ece']:.3f})")
        # Marker area follows the bin's share of the points: sparse bins are noisy.
        share = np.array([b["count"] for b in bins]) / cal["n"]
        ax.scatter(x, y, s=8 + 400 * share, color=line.get_color(), alpha=0.7)
    ax.set_xlabel("predicted visibility probability (bin mean)")
    ax.set_ylabel("share of annotated-visible points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write_with(pathlib.Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)

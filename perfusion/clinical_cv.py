"""Cross-validation of the shipped model: what perfusion_fit builds, fitted in every fold.

In each fold `fitting.fit_model` fits on the training studies exactly what a model folder
holds (features, cross-fitted normal limits, the label models chosen and calibrated, the
operating point, the segment model) and `analyze.analyze_arrays` applies it to the held-out
studies, the code that fits and applies a model folder. The pooled out-of-fold reports are
scored by `evaluation.evaluate_rows`, as a held-out folder is: per-patient and per-vessel ROC
AUC, sensitivity and specificity at each fold's operating point, ischemia vs infarction,
territory exact set and segment F1, with 95% bootstrap intervals. The folds are those of the
other perfusion_cv rows (stratified normal vs abnormal, `classifiers.stratified_folds`), with
the same seed and bootstrap draws.
"""

from __future__ import annotations

import numpy as np

from perfusion import analyze, classifiers, evaluation, fitting, studies

# Published per-patient and per-vessel ROC AUCs, for orientation only: real patients against
# invasive angiography, where ours are simulated studies against their simulated defects.
PUBLISHED_ANCHORS = {
    "note": "real patients, obstructive disease on invasive angiography; ours are simulated",
    "Betancur 2018, deep learning": {"patient": 0.80, "vessel": 0.76},
    "Betancur 2018, TPD": {"patient": 0.78, "vessel": 0.73},
    "Otaki 2022, deep learning": {"patient": 0.83, "vessel": None},
}


def read_folder(data_dir, *, size: int = 128, colormap=None, progress: bool = False):
    """(studies, skipped [{file, reason}], true masks (N, 2, S, S) or None) of a labelled
    folder; an unreadable study is skipped with its reason, never the end of the run."""
    skipped = []
    found = studies.read_study_folder(
        data_dir, colormap=colormap, size=size, progress=progress, skipped=skipped
    )
    masks = evaluation.load_true_masks(data_dir, [s.name for s in found], size)
    return found, [{"file": f, "reason": r} for f, r in skipped], masks


def cross_validate_clinical(
    studies_list,
    masks: np.ndarray | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = False,
    **fit_settings,
) -> dict:
    """Out-of-fold reports and metrics of `fitting.fit_model` on labelled studies.

    masks: (N, 2, S, S) true defect masks or None (the fit tunes the blackout on them).
    fit_settings: `fitting.fit_model`'s (model, size, k, uncertain_band, operating_point...);
    seed is the folds', the fit's and the bootstrap's. Returns a JSON-ready dict.
    """
    labels = np.array([s.label for s in studies_list])
    _, y, _ = classifiers.task_targets(labels, "abnormal")
    counts = {v: int((labels == v).sum()) for v in studies.LABELS}
    splits = classifiers.stratified_folds(y, folds, seed)
    if progress:
        from tqdm import tqdm

        splits = tqdm(splits, desc=f"clinical cv ({len(labels)} studies)", unit="fold")
    rows: list = [None] * len(labels)
    per_fold = []
    for f, (train_idx, test_idx) in enumerate(splits):
        model = fitting.fit_model(
            [studies_list[i] for i in train_idx],
            None if masks is None else masks[train_idx],
            seed=seed,
            source=f"fold {f + 1} of {folds}",
            **fit_settings,
        )
        for start in range(0, len(test_idx), analyze.CHUNK):  # bounded memory, as analyze
            chunk = test_idx[start : start + analyze.CHUNK]
            reports, _ = analyze.analyze_arrays(model, [studies_list[i] for i in chunk])
            for i, r in zip(chunk, reports, strict=True):
                rows[i] = {"file": studies_list[i].name, "fold": f, **r}
        fit = model.meta["fit"]
        per_fold.append(
            {
                "n_train": len(train_idx),
                "n_test": len(test_idx),
                "operating_point": model.operating_point.to_dict(),
                "label_models": {t: fit[f"{t}_oof"]["model"] for t in fitting.TASK_MODELS},
                "k": model.config.k,
            }
        )
    truth = [
        {"file": s.name, "label": s.label, "territories": s.territories, "segments": s.segments}
        for s in studies_list
    ]
    return {
        "model": "clinical",
        "folds": folds,
        "seed": seed,
        "n": len(labels),
        "label_counts": counts,
        "fit_settings": {k: v for k, v in fit_settings.items() if k != "unet_config"},
        "per_fold": per_fold,
        "evaluation": evaluation.evaluate_rows(rows, truth, n_boot=n_boot, seed=seed),
        "published": PUBLISHED_ANCHORS,
        "oof_reports": rows,
        "truth": truth,
    }


def summary_lines(result: dict) -> list[str]:
    """The figures of a clinical cross-validation beside the published anchors, as text."""
    m = result["evaluation"]
    roc, ci = m["roc_auc"], m["ci95"]

    def auc(entry):
        if entry is None:
            return "-"
        lo, hi = entry["ci95"] or (float("nan"),) * 2
        return f"{entry['value']:.3f} ({lo:.3f}-{hi:.3f})"

    def share(key):
        lo, hi = ci.get(key) or (float("nan"),) * 2
        return "-" if m[key] is None else f"{m[key]:.3f} ({lo:.3f}-{hi:.3f})"

    thresholds = [p["operating_point"]["threshold"] for p in result["per_fold"]]
    rule = result["per_fold"][0]["operating_point"]["rule"] if thresholds else "-"
    lines = [
        f"per-patient ROC AUC {auc(roc['patient'])}; stress TPD alone {auc(roc['patient_tpd'])}",
        f"per-vessel ROC AUC, pooled {auc(roc['vessel'] and roc['vessel']['pooled'])}; "
        + ", ".join(
            f"{n} {auc(roc['vessel'] and roc['vessel'][n])}" for n in ("LAD", "LCX", "RCA")
        ),
        f"per-vessel ROC AUC of the summed stress score, pooled {auc(roc['vessel_sss']['pooled'])}",
        f"at the operating point {rule} (thresholds {', '.join(f'{t:.3f}' for t in thresholds)}): "
        f"sensitivity {share('sensitivity')}, specificity {share('specificity')}",
        f"ischemia vs infarction {share('ischemia_vs_infarction_accuracy')}, territory exact set "
        f"{share('territory_exact_accuracy')}, segment F1 {m['segment']['f1']:.3f}",
        "published ("
        + PUBLISHED_ANCHORS["note"]
        + "): "
        + "; ".join(
            f"{name} {v['patient']:.2f} per patient"
            + (f", {v['vessel']:.2f} per vessel" if v["vessel"] else "")
            for name, v in PUBLISHED_ANCHORS.items()
            if name != "note"
        ),
    ]
    return lines

"""Methods side by side: the same stratified folds, the same bootstrap, difficulty curves.

Methods (each a binary classifier for the tasks "abnormal" and "ischemia_vs_infarction"):
  strip_rf, strip_xgb   the published strip/ring features (F-test top 10), random forest and
                        XGBoost with the published settings: the baseline rows
  tpd                   TPD alone (abnormal: stress TPD; ischemia vs infarction: rest TPD over
                        stress TPD), a one-feature logistic fit that places the threshold
  summed_scores         the summed scores alone (abnormal: SSS; ischemia vs infarction: SDS
                        over SSS)
  polar_logistic        the fitted pipeline's label features (fitting.label_features):
  polar_xgb             per-segment deviations from sex-specific normal limits and the
                        uptake's own strip/ring features; logistic regression or XGBoost
  cnn                   a small CNN trained from scratch on the stress and rest uptake maps

Normal limits are fitted inside each fold, on the normal studies outside the test fold
(cross-fitted for the training normals), so no test study ever shapes its own features.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from cardiac_core.fileio import atomic_write_bytes
from experiments.studies import perfusion_figures
from perfusion import classifiers, features, fitting, geometry, scores, studies

METHODS = (
    "strip_rf",
    "strip_xgb",
    "tpd",
    "summed_scores",
    "polar_logistic",
    "polar_xgb",
    "cnn",
)
BINARY_TASKS = ("abnormal", "ischemia_vs_infarction")


def method_parameters(method: str) -> dict:
    """The settings of a method, as the tables print them."""
    if method.startswith("strip_"):
        return {"features": "F-test top 10", **classifiers.MODEL_PARAMETERS[method[6:]]}
    if method == "polar_xgb":
        return {"features": "polar", **classifiers.MODEL_PARAMETERS["xgb_tuned"]}
    if method == "cnn":
        from perfusion import cnn

        c = cnn.SMALL_UPTAKE_CNN
        return dict(
            net="3 conv blocks 16-32-64",
            image_size=c.image_size,
            epochs=c.epochs,
            adam=c.learning_rate,
        )
    return {"features": "polar" if method == "polar_logistic" else "one score", "C": 1.0}


@dataclasses.dataclass
class StudyArrays:
    """The arrays of a list of labelled studies that every method reads."""

    stress: np.ndarray  # (N, S, S) float32 uptake
    rest: np.ndarray
    labels: np.ndarray  # (N,) str
    sexes: list
    strip: np.ndarray  # (N, 252) published strip/ring features of the RGB maps
    depth: np.ndarray  # (N,) deepest simulated defect (nan when unknown)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_studies(cls, studies, depth=None) -> StudyArrays:
        if any(s.label is None for s in studies):
            raise ValueError("the methods comparison needs labelled studies")
        n = len(studies)
        return cls(
            stress=np.stack([s.stress_uptake for s in studies]).astype(np.float32),
            rest=np.stack([s.rest_uptake for s in studies]).astype(np.float32),
            labels=np.array([s.label for s in studies]),
            sexes=[s.sex for s in studies],
            strip=features.study_feature_matrix(studies),
            depth=np.full(n, np.nan) if depth is None else np.asarray(depth, np.float64),
        )

    @classmethod
    def from_folder(cls, root, *, size: int = 128, progress: bool = False) -> StudyArrays:
        """A labelled study folder, with the simulator's depth column when labels.csv has it."""
        found = studies.read_study_folder(root, size=size, progress=progress)
        depth = {
            os.path.splitext(r["filename"])[0]: r["depth"]
            for r in studies.read_labels(os.path.join(root, "labels.csv"))
        }
        values = [np.nan if depth.get(s.name) is None else depth[s.name] for s in found]
        return cls.from_studies(found, depth=values)

    @classmethod
    def concatenate(cls, parts: Sequence[StudyArrays]) -> StudyArrays:
        return cls(
            stress=np.concatenate([p.stress for p in parts]),
            rest=np.concatenate([p.rest for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            sexes=[s for p in parts for s in p.sexes],
            strip=np.concatenate([p.strip for p in parts]),
            depth=np.concatenate([p.depth for p in parts]),
        )


class FoldFeatures:
    """Normal-limit features of every study, the limits fitted on a given training pool
    (cached per pool, so the methods and tasks of one comparison share them)."""

    def __init__(self, data: StudyArrays, *, chunk: int = 128):
        self.data = data
        self.chunk = chunk
        self._cache: dict[bytes, dict[str, np.ndarray]] = {}

    def __call__(self, train: np.ndarray) -> dict[str, np.ndarray]:
        """Features of all N studies, with limits fitted on the normals among `train` only."""
        key = np.sort(train).tobytes()
        if key not in self._cache:
            self._cache[key] = self._compute(np.sort(train))
        return self._cache[key]

    def _compute(self, train: np.ndarray) -> dict[str, np.ndarray]:
        d = self.data
        seg = geometry.segment_map(d.stress.shape[-1])
        limits, mean_tr, sd_tr = scores.cross_fitted_limits(
            d.stress[train], d.rest[train], d.labels[train], [d.sexes[i] for i in train]
        )
        polar, clinical = [], []
        for start in range(0, len(d), self.chunk):
            idx = np.arange(start, min(start + self.chunk, len(d)))
            mean, sd = limits.stack_for([d.sexes[i] for i in idx])
            own = np.isin(idx, train)  # training studies: their cross-fitted limits
            where = np.searchsorted(train, idx[own])
            mean[own], sd[own] = mean_tr[where], sd_tr[where]
            polar.append(fitting.label_features(d.stress[idx], d.rest[idx], mean, sd, seg))
            out = scores.score_studies(d.stress[idx], d.rest[idx], mean, sd, seg)
            clinical.append(
                np.stack([out["tpd"][:, 0], out["tpd"][:, 1], out["sss"], out["sds"]], 1)
            )
        clinical = np.concatenate(clinical).astype(np.float64)
        tpd_s, tpd_r, sss, sds = clinical.T
        return {
            "polar": np.concatenate(polar),
            "tpd_abnormal": tpd_s[:, None],
            "tpd_ischemia_vs_infarction": (tpd_r / (tpd_s + 0.1))[:, None],
            "summed_scores_abnormal": sss[:, None],
            "summed_scores_ischemia_vs_infarction": (sds / np.maximum(sss, 1.0))[:, None],
        }


def method_fit_predict_proba(
    method: str,
    data: StudyArrays,
    task: str,
    *,
    universe=None,
    seed: int = 0,
    cnn_config=None,
    fold_features: FoldFeatures | None = None,
):
    """(task indices into data, targets, `fit_predict_proba(train, test)` in task positions).

    universe: the studies whose normals may build the limits (default all); the test studies
    are always left out of them.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    universe = np.arange(len(data)) if universe is None else np.asarray(universe)
    idx, y, _ = classifiers.task_targets(data.labels, task)
    fold_features = fold_features or FoldFeatures(data)
    cnn_inputs = None

    def fit_predict_proba(train_pos, test_pos):
        nonlocal cnn_inputs
        train_g, test_g = idx[train_pos], idx[test_pos]
        if method.startswith("strip_"):
            model = classifiers.make_model(method[6:], seed=seed).fit(
                data.strip[train_g], y[train_pos]
            )
            return model.predict_proba(data.strip[test_g])
        if method == "cnn":
            from perfusion import cnn

            config = cnn_config or dataclasses.replace(cnn.SMALL_UPTAKE_CNN, seed=seed)
            if cnn_inputs is None:
                cnn_inputs = cnn.uptake_inputs(
                    data.stress, data.rest, data.sexes, config.image_size
                )
            net, variables, _ = cnn.train_classifier(
                cnn_inputs[train_g], y[train_pos], num_classes=2, config=config
            )
            return cnn.predict_classifier(
                net, variables, cnn_inputs[test_g], image_size=config.image_size
            )
        pool = np.setdiff1d(universe, test_g)
        feats = fold_features(pool)
        if method.startswith("polar_"):
            X, name, k = feats["polar"], method[6:].replace("xgb", "xgb_tuned"), "all"
        else:
            X, name, k = feats[f"{method}_{task}"], "logistic", "all"
        model = classifiers.make_model(name, k=k, seed=seed).fit(X[train_g], y[train_pos])
        return model.predict_proba(X[test_g])

    return idx, y, fit_predict_proba


def compare_methods(
    data: StudyArrays,
    methods=METHODS,
    tasks=BINARY_TASKS,
    *,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    cnn_config=None,
    progress: bool = False,
) -> dict:
    """{task: {method: classifiers.cross_validate result}}, every method on the same folds."""
    out = {}
    shared = FoldFeatures(data)
    for task in tasks:
        out[task] = {}
        for method in methods:
            _, y, fpp = method_fit_predict_proba(
                method, data, task, seed=seed, cnn_config=cnn_config, fold_features=shared
            )
            _, _, names = classifiers.task_targets(data.labels, task)
            result = classifiers.cross_validate(
                None,
                y,
                method,
                fit_predict_proba=fpp,
                folds=folds,
                seed=seed,
                n_boot=n_boot,
                class_names=names,
                progress=progress,
            )
            result["parameters"] = method_parameters(method)
            out[task][method] = result
    return out


def difficulty_curve(
    train: StudyArrays,
    levels: dict[float, StudyArrays],
    methods=METHODS,
    *,
    seed: int = 0,
    cnn_config=None,
    progress: bool = False,
) -> dict:
    """Each method fitted once on `train`, scored on held-out sets of one defect depth each.

    Returns {"depths": [...], method: {"abnormal_accuracy", "abnormal_auc",
    "ischemia_vs_infarction_accuracy": [one per depth]}}.
    """
    depths = sorted(levels)
    data = StudyArrays.concatenate([train] + [levels[d] for d in depths])
    owner = np.concatenate(
        [np.full(len(train), -1)] + [np.full(len(levels[d]), j) for j, d in enumerate(depths)]
    )
    universe = np.flatnonzero(owner < 0)
    shared = FoldFeatures(data)
    out: dict = {"depths": [float(d) for d in depths]}
    items = [(m, t) for m in methods for t in BINARY_TASKS]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="difficulty curve", unit="fit")
    for method, task in items:
        idx, y, fpp = method_fit_predict_proba(
            method,
            data,
            task,
            universe=universe,
            seed=seed,
            cnn_config=cnn_config,
            fold_features=shared,
        )
        level = owner[idx]
        p = fpp(np.flatnonzero(level < 0), np.flatnonzero(level >= 0))[:, 1]
        y_test, level_test = y[level >= 0], level[level >= 0]
        row = out.setdefault(method, {})
        accuracy, auc = [], []
        for j in range(len(depths)):
            sel = level_test == j
            m = classifiers.classification_metrics(y_test[sel], np.stack([1 - p[sel], p[sel]], 1))
            accuracy.append(m["accuracy"])
            auc.append(m["roc_auc"])
        row[f"{task}_accuracy"] = accuracy
        if task == "abnormal":
            row["abnormal_auc"] = auc
    return out


def comparison_markdown(result: dict) -> str:
    """One table per task: accuracy and ROC AUC with 95% bootstrap intervals, per method."""
    lines = []
    for task, rows in result.items():
        any_row = next(iter(rows.values()))
        counts = dict(zip(any_row["class_names"], any_row["class_counts"], strict=True))
        lines += [
            f"**{task}** ({counts})",
            "",
            "| method | accuracy (95% CI) | ROC AUC (95% CI) | F1 |",
            "|---|---|---|---|",
        ]
        for method, r in rows.items():
            m = r["metrics"]
            cell = {
                k: f"{m[k]['value']:.3f} ({m[k]['ci95'][0]:.3f}-{m[k]['ci95'][1]:.3f})"
                for k in ("accuracy", "roc_auc")
            }
            lines.append(
                f"| {method} | {cell['accuracy']} | {cell['roc_auc']} | {m['f1']['value']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def level_depth(data: StudyArrays) -> float:
    """The defect depth of a held-out set made at one depth: the median over its abnormal
    studies."""
    depths = data.depth[(data.labels != "normal") & np.isfinite(data.depth)]
    if not len(depths):
        raise ValueError("a difficulty level needs abnormal studies with a depth in labels.csv")
    return float(np.median(depths))


def run_comparison(
    data_dir,
    *,
    level_dirs=(),
    methods=METHODS,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    size: int = 128,
    progress: bool = False,
) -> dict:
    """The methods on one labelled folder (cross-validation) and, when level folders are
    given, their difficulty curve (fitted on the whole folder, scored on each level)."""
    data = StudyArrays.from_folder(data_dir, size=size, progress=progress)
    result = {
        "data": os.fspath(data_dir),
        "counts": {lab: int((data.labels == lab).sum()) for lab in studies.LABELS},
        "cv": compare_methods(
            data, methods, folds=folds, seed=seed, n_boot=n_boot, progress=progress
        ),
    }
    if level_dirs:
        levels = {}
        for d in level_dirs:
            level = StudyArrays.from_folder(d, size=size, progress=progress)
            levels[level_depth(level)] = level
        result["difficulty"] = difficulty_curve(data, levels, methods, seed=seed, progress=progress)
        result["difficulty"]["folders"] = [os.fspath(d) for d in level_dirs]
    return result


def write_comparison(
    result: dict, out_json, *, markdown=None, plot=None, table1=None, header: str = ""
):
    """The JSON (out-of-fold probabilities dropped), the markdown tables, the curve plot, and
    the normal-vs-abnormal rows in the seed's Table 1 layout beside the published ones."""
    slim = json.loads(json.dumps(result))
    for rows in slim["cv"].values():
        for r in rows.values():
            r.pop("oof_probabilities", None)
            r.pop("oof_fold", None)
    atomic_write_bytes(out_json, json.dumps(slim, indent=1).encode())
    if markdown is not None:
        text = header + "\n\n" + comparison_markdown(result["cv"])
        if "difficulty" in result:
            text += "\n" + difficulty_markdown(result["difficulty"])
        atomic_write_bytes(markdown, text.encode())
    if table1 is not None:
        title = (
            "# Perfusion Table 1: normal vs abnormal, cross-validated\n\n"
            f"{header} Ours: pooled out-of-fold value (95% bootstrap interval), every method "
            "on the same folds."
        )
        text = classifiers.table1_markdown(result["cv"]["abnormal"], title=title)
        atomic_write_bytes(table1, text.encode())
    if plot is not None and "difficulty" in result:
        perfusion_figures.plot_difficulty_curve(result["difficulty"], plot)


def difficulty_markdown(curve: dict) -> str:
    """Accuracy / AUC per depth, one row per method."""
    depths = curve["depths"]
    head = " | ".join(f"{100 * d:.0f}%" for d in depths)
    lines = [
        "Normal vs abnormal accuracy / ROC AUC, and ischemia vs infarction accuracy, by defect "
        "depth:",
        "",
        f"| method | {head} |",
        "|---|" + "---|" * len(depths),
    ]
    for method, row in curve.items():
        if method in ("depths", "folders"):
            continue
        cells = [
            f"{a:.2f} / {u:.2f} / {i:.2f}"
            for a, u, i in zip(
                row["abnormal_accuracy"],
                row["abnormal_auc"],
                row["ischemia_vs_infarction_accuracy"],
                strict=True,
            )
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table1_results(
    studies_list, models, *, folds: int = 5, seed: int = 0, n_boot: int = 1000
) -> dict:
    """Normal vs abnormal CV results of Table 1 per model: methods of this module on the same
    folds, or the older perfusion.classifiers names (rf, xgb, resnet50, ...)."""
    arrays = None
    results = {}
    for m in models:
        if m in METHODS:
            arrays = arrays or StudyArrays.from_studies(studies_list)
            results[m] = compare_methods(
                arrays, (m,), ("abnormal",), folds=folds, seed=seed, n_boot=n_boot
            )["abnormal"][m]
        else:
            results[m] = classifiers.run_study_cv(
                studies_list, "abnormal", m, folds=folds, seed=seed, n_boot=n_boot
            )
    return results

"""Classical models on study features: F-test selection, random forest, XGBoost, CV, export.

The only perfusion module importing scikit-learn and xgboost. `cross_validate` runs stratified
k-fold with a fixed seed over any `fit_predict_proba(train_idx, test_idx) -> probabilities`
callable, so the Flax CNN (perfusion.cnn) shares the fold loop and the metrics.

Fitted models leave this module as a `PortableModel`: plain arrays (tree nodes, coefficients)
and xgboost's own JSON model, saved in an .npz read with allow_pickle=False. Loading a model
therefore runs no code from the file, unlike a pickled (joblib) scikit-learn pipeline.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import zipfile
from collections.abc import Callable

import numpy as np
import xgboost
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from cardiac_core.fileio import atomic_write_bytes

TASKS = ("abnormal", "ischemia_vs_infarction", "three_class")
FEATURE_MODELS = ("rf", "xgb", "xgb_tuned", "logistic")
METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")
# The published models' settings (the seed study's Table 1) and ours.
MODEL_PARAMETERS = {
    "rf": dict(max_depth=4, n_estimators=100),
    "xgb": dict(n_estimators=700, max_depth=2, learning_rate=0.003),  # the published boosting
    "xgb_tuned": dict(
        n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8, colsample_bytree=0.8
    ),
    "logistic": dict(C=1.0),  # on standardised features
}


def task_targets(labels, task: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(indices of the studies in the task, integer targets, class names) from label strings."""
    labels = np.asarray(labels)
    if task == "abnormal":
        return np.arange(len(labels)), (labels != "normal").astype(np.int64), ("normal", "abnormal")
    if task == "ischemia_vs_infarction":
        idx = np.flatnonzero(labels != "normal")
        return idx, (labels[idx] == "infarction").astype(np.int64), ("ischemia", "infarction")
    if task == "three_class":
        names = ("normal", "ischemia", "infarction")
        return np.arange(len(labels)), np.array([names.index(v) for v in labels]), names
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_model(name: str, *, k: int | str = 10, seed: int = 0, **overrides) -> Pipeline:
    """ANOVA F-test SelectKBest(k) ("all": no selection) then the classifier, one pipeline.

    overrides: settings that replace MODEL_PARAMETERS[name]'s (e.g. C=0.1 for "logistic").
    """
    if name not in MODEL_PARAMETERS:
        raise ValueError(f"unknown model {name!r}; expected one of {FEATURE_MODELS}")
    params = {**MODEL_PARAMETERS[name], **overrides}
    steps = [("select", "passthrough" if k == "all" else SelectKBest(f_classif, k=k))]
    if name == "rf":
        steps.append(("model", RandomForestClassifier(**params, random_state=seed, n_jobs=1)))
    elif name == "logistic":
        steps.append(("scale", StandardScaler()))
        steps.append(("model", LogisticRegression(**params, max_iter=5000)))
    else:
        clf = XGBClassifier(**params, random_state=seed, n_jobs=1, tree_method="hist")
        steps.append(("model", clf))
    return Pipeline(steps)


def feature_fit_predict_proba(
    X, y, name: str, *, k: int | str = 10, seed: int = 0, **overrides
) -> Callable:
    """`fit_predict_proba(train_idx, test_idx)` for a feature model (selection inside the fold)."""
    X, y = np.asarray(X), np.asarray(y)

    def fit_predict_proba(train_idx, test_idx):
        kk = k if k == "all" else min(k, X.shape[1])
        model = make_model(name, k=kk, seed=seed, **overrides)
        model.fit(X[train_idx], y[train_idx])
        return model.predict_proba(X[test_idx])

    return fit_predict_proba


def _as_class_probs(p, n_classes: int) -> np.ndarray:
    p = np.asarray(p, np.float64)
    if n_classes == 2 and (p.ndim == 1 or p.shape[-1] == 1):
        p = p.reshape(-1)
        return np.stack([1 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"expected probabilities (n, {n_classes}), got shape {p.shape}")
    # scores that do not quite sum to one (float32 softmax, ad-hoc callables) are renormalised
    return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)


def classification_metrics(y, probs) -> dict[str, float]:
    """accuracy, precision, recall, F1, ROC AUC; macro averages and one-vs-rest AUC if C > 2."""
    y = np.asarray(y)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    avg = "binary" if n_classes == 2 else "macro"
    out = dict(
        accuracy=accuracy_score(y, pred),
        precision=precision_score(y, pred, average=avg, zero_division=0),
        recall=recall_score(y, pred, average=avg, zero_division=0),
        f1=f1_score(y, pred, average=avg, zero_division=0),
    )
    if len(np.unique(y)) < n_classes:
        out["roc_auc"] = float("nan")  # undefined without every class present
    elif n_classes == 2:
        out["roc_auc"] = roc_auc_score(y, probs[:, 1])
    else:
        out["roc_auc"] = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    return {k: float(v) for k, v in out.items()}


def bootstrap_intervals(y, probs, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """95% percentile bootstrap interval of each metric over the out-of-fold predictions."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    samples = {m: [] for m in METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for m, v in classification_metrics(y[idx], probs[idx]).items():
            samples[m].append(v)
    out = {}
    for m, vals in samples.items():
        vals = np.asarray(vals)
        vals = vals[np.isfinite(vals)]
        lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2]) if len(vals) else (np.nan,) * 2
        out[m] = [float(lo), float(hi)]
    return out


def stratified_folds(y, folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) indices of stratified k-fold, shuffled with a fixed seed: the folds of
    every cross-validated row (perfusion_cv, the clinical cross-validation)."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def cross_validate(
    X,
    y,
    model_name: str | None = None,
    *,
    fit_predict_proba: Callable | None = None,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    class_names=None,
    progress: bool = False,
) -> dict:
    """Stratified k-fold CV (fixed seed) of a feature model or of any fit_predict_proba.

    Returns a JSON-ready dict: pooled out-of-fold metrics with 95% bootstrap intervals,
    per-fold metrics, the confusion matrix (rows true, columns predicted) and the
    out-of-fold probabilities.
    """
    y = np.asarray(y)
    n_classes = int(y.max()) + 1 if class_names is None else len(class_names)
    if fit_predict_proba is None:
        if model_name is None or X is None:
            raise ValueError("cross_validate needs X and a model name, or fit_predict_proba")
        fit_predict_proba = feature_fit_predict_proba(X, y, model_name, seed=seed)
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < folds:
        raise ValueError(
            f"each class needs at least {folds} studies for {folds}-fold CV, got {counts}"
        )
    probs = np.zeros((len(y), n_classes))
    fold_of = np.zeros(len(y), np.int64)
    per_fold = []
    splits = stratified_folds(y, folds, seed)
    if progress:
        from tqdm import tqdm

        splits = tqdm(splits, desc=f"cv {model_name or 'model'}", unit="fold")
    for f, (train_idx, test_idx) in enumerate(splits):
        p = _as_class_probs(fit_predict_proba(train_idx, test_idx), n_classes)
        probs[test_idx] = p
        fold_of[test_idx] = f
        per_fold.append(classification_metrics(y[test_idx], p))
    metrics = classification_metrics(y, probs)
    intervals = bootstrap_intervals(y, probs, n_boot=n_boot, seed=seed)
    return dict(
        model=model_name,
        folds=folds,
        seed=seed,
        n=int(len(y)),
        class_names=list(class_names) if class_names is not None else list(range(n_classes)),
        class_counts=counts.tolist(),
        metrics={m: dict(value=metrics[m], ci95=intervals[m]) for m in METRICS},
        per_fold=per_fold,
        confusion_matrix=confusion_matrix(y, probs.argmax(1), labels=range(n_classes)).tolist(),
        parameters=MODEL_PARAMETERS.get(model_name, {}),
        oof_probabilities=probs.round(6).tolist(),
        oof_fold=fold_of.tolist(),
    )


CNN_MODELS = ("resnet50", "resnet152")
PUBLISHED_TABLE1 = (  # the seed study's Table 1: normal vs abnormal, 5-fold CV on 196 images
    ("Random forest", 0.90, 0.91, 0.92, 0.93, "max_depth=4, n_estimators=100"),
    ("CatBoost", 0.90, 0.91, 0.92, 0.94, "iterations=700, depth=2, lr=0.003"),
    ("ResNet50 (ImageNet)", 0.88, 0.92, 0.90, 0.89, "150 epochs, Adam 0.003, BCE"),
    ("ResNet152", 0.85, 0.96, 0.88, 0.82, "50 epochs, Adam 0.003, BCE"),
)


def run_study_cv(
    studies,
    task: str,
    model: str,
    *,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    cnn_config=None,
    progress: bool = False,
) -> dict:
    """Cross-validate a model on a list of perfusion.studies.Study for one task."""
    from perfusion import features

    missing = [s.name for s in studies if s.label is None]
    if missing:
        raise ValueError(f"studies without a label: {missing[:5]}")
    idx, y, names = task_targets([s.label for s in studies], task)
    chosen = [studies[i] for i in idx]
    if model in CNN_MODELS:
        from perfusion import cnn  # the Flax ResNet lives with the other helper's models

        config = cnn_config or cnn.ClassifierConfig(backbone=model, seed=seed)
        images = cnn.classifier_inputs(
            np.stack([s.stress_rgb for s in chosen]),
            np.stack([s.rest_rgb for s in chosen]),
            config.image_size,
        )
        fpp = cnn.make_fit_predict_proba(images, y, num_classes=len(names), config=config)
        result = cross_validate(
            None,
            y,
            model,
            fit_predict_proba=fpp,
            folds=folds,
            seed=seed,
            n_boot=n_boot,
            class_names=names,
            progress=progress,
        )
        result["parameters"] = dict(vars(config)) if hasattr(config, "__dict__") else {}
    elif model in MODEL_PARAMETERS:
        X = features.study_feature_matrix(chosen)
        result = cross_validate(
            X, y, model, folds=folds, seed=seed, n_boot=n_boot, class_names=names, progress=progress
        )
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {FEATURE_MODELS + CNN_MODELS}")
    result.update(task=task, files=[s.name for s in chosen])
    return result


def table1_markdown(results: dict[str, dict], *, title: str = "") -> str:
    """Markdown of the seed's Table 1 layout: ours (normal vs abnormal CV) beside the paper's."""
    lines = [title, ""] if title else []
    lines += [
        "| model | accuracy | precision | F1 | recall | ROC AUC | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["metrics"]

        def cell(k, m=m):
            lo, hi = m[k]["ci95"]
            return f"{m[k]['value']:.2f} ({lo:.2f}-{hi:.2f})"

        params = ", ".join(f"{k}={v}" for k, v in r.get("parameters", {}).items())
        lines.append(
            f"| {name} (ours) | {cell('accuracy')} | {cell('precision')} | {cell('f1')} | "
            f"{cell('recall')} | {cell('roc_auc')} | {params} |"
        )
    for name, acc, prec, f1, rec, params in PUBLISHED_TABLE1:
        lines.append(
            f"| {name} (published) | {acc:.2f} | {prec:.2f} | {f1:.2f} | {rec:.2f} | - | {params} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ portable models


@dataclasses.dataclass
class PortableModel:
    """A fitted binary feature model as plain arrays: saved and loaded without pickle.

    kind "forest": a random forest's nodes, all trees concatenated; "linear": standardisation
    and logistic coefficients; "xgboost": the booster in xgboost's JSON model format.
    `predict_proba(X)` gives (N, 2), as the scikit-learn pipeline it came from.
    """

    kind: str
    selected: np.ndarray  # (k,) int: the feature columns the F-test kept, in order
    arrays: dict[str, np.ndarray]
    booster: xgboost.Booster | None = None

    def predict_proba(self, X) -> np.ndarray:
        x = np.asarray(X, np.float64)[:, self.selected]
        a = self.arrays
        if self.kind == "linear":
            z = ((x - a["mean"]) / a["scale"]) @ a["coef"] + a["intercept"][0]
            p = 1.0 / (1.0 + np.exp(-z))
        elif self.kind == "xgboost":
            p = self.booster.predict(xgboost.DMatrix(x.astype(np.float32)))
        else:
            p = _forest_predict(a, x.astype(np.float32))
        return np.stack([1.0 - p, p], axis=1)

    def to_bytes(self) -> bytes:
        arrays = {f"array_{k}": v for k, v in self.arrays.items()}
        if self.booster is not None:
            arrays["booster_json"] = np.frombuffer(self.booster.save_raw("json"), np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(
            buf, kind=np.array(self.kind), selected=self.selected.astype(np.int64), **arrays
        )
        return buf.getvalue()

    def save(self, path) -> None:
        """One .npz (atomic write)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path) -> PortableModel:
        """Reads a model saved by `save`; a broken or foreign file is a one-line ValueError."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                kind = str(z["kind"])
                selected = z["selected"].astype(np.int64)
                arrays = {k[6:]: z[k] for k in z.files if k.startswith("array_")}
                raw = z["booster_json"].tobytes() if "booster_json" in z.files else None
            booster = None
            if kind == "xgboost":
                booster = xgboost.Booster()
                booster.load_model(bytearray(raw))
            model = cls(kind, selected, arrays, booster)
            model.predict_proba(np.zeros((1, int(selected.max(initial=0)) + 1)))  # complete?
        except (
            OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile,
            xgboost.core.XGBoostError,
        ) as e:  # fmt: skip
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a readable model file ({reason}); re-fit it") from None
        return model


def _forest_predict(a: dict, x: np.ndarray) -> np.ndarray:
    """P(class 1) of a random forest stored as arrays: all trees walked together, level by
    level. x is float32, compared against float64 thresholds as scikit-learn does."""
    node = np.broadcast_to(a["roots"], (len(x), len(a["roots"]))).copy()  # (N, trees)
    rows = np.arange(len(x))[:, None]
    for _ in range(int(a["depth"][0])):
        left = a["left"][node]
        go_left = x[rows, np.maximum(a["feature"][node], 0)] <= a["threshold"][node]
        node = np.where(left < 0, node, np.where(go_left, left, a["right"][node]))
    return a["value"][node].mean(axis=1)


def export_model(pipeline: Pipeline) -> PortableModel:
    """The PortableModel of a pipeline fitted by `make_model` (binary tasks)."""
    select = pipeline.named_steps["select"]
    if select == "passthrough":
        selected = np.arange(pipeline[-1].n_features_in_, dtype=np.int64)
    else:
        selected = select.get_support(indices=True).astype(np.int64)
    clf = pipeline.named_steps["model"]
    if len(clf.classes_) != 2:
        raise ValueError(f"only binary models export, this one has classes {clf.classes_}")
    if isinstance(clf, LogisticRegression):
        scale = pipeline.named_steps["scale"]
        arrays = dict(
            mean=scale.mean_.astype(np.float64),
            scale=scale.scale_.astype(np.float64),
            coef=clf.coef_[0].astype(np.float64),
            intercept=clf.intercept_.astype(np.float64),
        )
        return PortableModel("linear", selected, arrays)
    if isinstance(clf, XGBClassifier):
        booster = xgboost.Booster()
        booster.load_model(bytearray(clf.get_booster().save_raw("json")))
        return PortableModel("xgboost", selected, {}, booster)
    trees = [est.tree_ for est in clf.estimators_]
    offsets = np.cumsum([0] + [t.node_count for t in trees])
    value = np.concatenate([t.value[:, 0, :] for t in trees]).astype(np.float64)
    value = value / np.maximum(value.sum(axis=1, keepdims=True), 1e-12)
    starts = offsets[:-1]

    def nodes(children):  # tree-local child ids -> ids in the concatenation, -1 at leaves
        return np.concatenate(
            [np.where(c < 0, -1, c + o) for c, o in zip(children, starts, strict=True)]
        )

    arrays = dict(
        roots=starts.astype(np.int64),
        left=nodes([t.children_left for t in trees]),
        right=nodes([t.children_right for t in trees]),
        feature=np.concatenate([t.feature for t in trees]).astype(np.int64),
        threshold=np.concatenate([t.threshold for t in trees]).astype(np.float64),
        value=value[:, 1],
        depth=np.array([max(t.max_depth for t in trees)]),
    )
    return PortableModel("forest", selected, arrays)


# ---------------------------------------------------------------------------- calibration


def fit_platt(p, y) -> tuple[float, float]:
    """Platt scaling fitted on out-of-fold probabilities: p' = sigmoid(a logit(p) + b)."""
    model = LogisticRegression(C=1e4, max_iter=1000).fit(_logit(p)[:, None], np.asarray(y))
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def apply_platt(p, a: float, b: float) -> np.ndarray:
    """Calibrated probabilities of `fit_platt`'s (a, b)."""
    return 1.0 / (1.0 + np.exp(-(a * _logit(p) + b)))


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1.0 - p))

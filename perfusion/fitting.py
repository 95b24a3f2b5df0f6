"""Fit a model directory on a labelled study folder, and load it back.

Model directory (written by `fit`, read by `load_model`; model.json is written last, so a
directory without it is incomplete). Nothing in it can run code when loaded: plain arrays in
.npz files read with allow_pickle=False, xgboost's JSON model inside them, JSON for the rest.
  model.json                   version, grid size, colormap, score thresholds, feature names,
                               calibration, operating point, segment threshold, abstention
                               band, fit summary
  normal_limits.npz            perfusion.scores.NormalLimits (per sex when enough normals)
  abnormal.npz                 normal vs abnormal on label_features (PortableModel)
  ischemia_vs_infarction.npz   ischemia vs infarction, the same features
  segments.npz                 per-segment defect model on scores.segment_features (when the
                               training labels list segments)
  unet/                        optional U-Net for the defect mask (msgpack parameters + JSON)
  manifest.json                written last: each file's role, format version and sha256
                               (cardiac_core.integrity); a swapped or edited file is refused

`fit_model` fits in memory on a list of studies (the clinical cross-validation fits it in
each fold), `save_model` writes the directory, `fit` does both for a study folder. Training
studies are scored against cross-fitted limits (a normal study never against limits that
include itself). Probabilities are Platt-calibrated on out-of-fold predictions of the
training folder, and the abnormal threshold (the operating point) is chosen on them.
`perfusion.analyze` applies the model (and offers `fit` and `load_model` too).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import numpy as np

from cardiac_core import integrity
from cardiac_core.fileio import atomic_write_bytes
from perfusion import classifiers, evaluation, features, geometry, reliability, scores, studies
from perfusion.evaluation import segments_bool, territories_bool, territories_of
from perfusion.operating_point import (
    LEGACY,
    OperatingPoint,
    choose_operating_point,
    parse_rule,
)
from perfusion.scores import ScoreConfig

LABELS = studies.LABELS
MODEL_VERSION = 5  # 3: defect persistence; 4: uptake strip/ring features; 5: defect reversal
TASK_MODELS = ("abnormal", "ischemia_vs_infarction")
MANIFEST_KIND = "perfusion_model"
RESAVE = "re-fit it (experiments/perfusion_fit.py) or seal it as is (perfusion.fitting.seal_model)"
DEFAULT_BAND = (0.25, 0.75)  # abstain when a probability lies in here (around 0.5)
# Sensitivity first: the test is there to rule disease out, so a missed defect costs more
# than a normal study sent on to a reader (docs/perfusion_clinical.md, Operating point).
DEFAULT_OPERATING_POINT = "sensitivity:0.95"
# model="auto": per task, the candidate with the lowest out-of-fold log loss on the training
# folder. No one model wins everywhere: on 150 studies with large defects, logistic regression
# on the polar features (the 135 before the persistence ones) is 0.93 accurate out of fold for
# normal vs abnormal and boosted trees 0.99 (a few features step cleanly there); on 600 mild
# studies logistic regression separated ischemia from infarction best (0.90 against 0.86),
# and with the persistence features the trees have the lower log loss there too.
# name -> (classifiers.make_model name, settings that replace its defaults).
AUTO_CANDIDATES = {
    "logistic": ("logistic", {}),
    "logistic_C0.1": ("logistic", {"C": 0.1}),
    "xgb_tuned": ("xgb_tuned", {}),
}


@dataclasses.dataclass
class AnalysisModel:
    """Everything `analyze_study` needs, as loaded from a model directory."""

    size: int
    limits: scores.NormalLimits
    config: ScoreConfig
    abnormal: classifiers.PortableModel
    ischemia_vs_infarction: classifiers.PortableModel
    calibration: dict  # task -> (a, b) Platt scaling
    segments: classifiers.PortableModel | None = None
    segment_threshold: float = 0.5
    uncertain_band: tuple[float, float] = DEFAULT_BAND
    operating_point: OperatingPoint = LEGACY  # the abnormal threshold and its rule
    colormap: str | None = None
    gate_by_label: bool = True
    unet: object | None = None
    meta: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ features


def stack_uptake(studies_list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(stress, rest) (B, S, S) float32 uptake of the studies; a map of another size raises."""
    for s in studies_list:
        if s.stress_uptake.shape != (size, size):
            raise ValueError(
                f"{s.name}: map size {s.stress_uptake.shape} but the model uses {size}"
            )
    stress = np.stack([s.stress_uptake for s in studies_list]).astype(np.float32)
    rest = np.stack([s.rest_uptake for s in studies_list]).astype(np.float32)
    return stress, rest


LABEL_FEATURE_NAMES = scores.POLAR_FEATURE_NAMES + features.UPTAKE_FEATURE_NAMES
# The reversal features (scores.defect_reversal) say how a stress defect recovers at rest:
# they tell ischemia from infarction (0.949 -> 0.974 and 0.897 -> 0.981 on two held-out
# clinical folders), not a defect from a normal map. Given to normal vs abnormal as well, they
# tipped its automatic choice to logistic regression on the easy folder, held out 0.992 ->
# 0.985 (docs/perfusion_clinical.md).
TASK_FEATURES = {
    "abnormal": tuple(n for n in LABEL_FEATURE_NAMES if not n.startswith("reversal_")),
    "ischemia_vs_infarction": LABEL_FEATURE_NAMES,
}


def task_columns(task: str) -> np.ndarray:
    """Indices of the task's features (TASK_FEATURES) among `label_features`' columns."""
    index = {name: i for i, name in enumerate(LABEL_FEATURE_NAMES)}
    return np.array([index[name] for name in TASK_FEATURES[task]])


def label_features(stress, rest, mean, sd, segments) -> np.ndarray:
    """(B, len(LABEL_FEATURE_NAMES)) float32: what the label models read.

    A study's deviations from its normal limits (scores.polar_features) and the strip/ring
    features of its uptake (features.uptake_features), which need no limits. With the second
    set, normal vs abnormal held out went from 0.985 to 0.993 on clinical-difficulty studies
    and from 0.987 to 0.997 on easy ones (docs/perfusion_clinical.md).
    """
    return np.concatenate(
        [
            scores.polar_features(stress, rest, mean, sd, segments),
            features.uptake_features(stress, rest),
        ],
        axis=1,
    )


def learned_features(stress, rest, mean, sd):
    """(label (B, F) per study, segment (B, 17, G) per segment) against the given limits."""
    seg = geometry.segment_map(stress.shape[-1])
    return (
        label_features(stress, rest, mean, sd, seg),
        scores.segment_features(stress, rest, mean, sd, seg),
    )


# ----------------------------------------------------------------------------------- fit


def _oof_probabilities(
    X, y, name: str, *, folds: int = 5, seed: int = 0, **overrides
) -> np.ndarray:
    """Out-of-fold P(class 1) of a feature model on the training folder."""
    fpp = classifiers.feature_fit_predict_proba(X, y, name, k="all", seed=seed, **overrides)
    return np.asarray(
        classifiers.cross_validate(
            X, y, name, fit_predict_proba=fpp, folds=folds, seed=seed, n_boot=0
        )["oof_probabilities"]
    )[:, 1]


def choose_label_model(X, y, model: str, *, seed: int = 0):
    """(pipeline fitted on all of X, its out-of-fold probabilities, summary) for one task.

    model: a classifiers.FEATURE_MODELS name, or "auto" for the AUTO_CANDIDATES entry with the
    lowest out-of-fold log loss (same folds for every candidate; the training folder only).
    """
    candidates = AUTO_CANDIDATES if model == "auto" else {model: (model, {})}
    oof, loss = {}, {}
    for name, (base, overrides) in candidates.items():
        oof[name] = _oof_probabilities(X, y, base, seed=seed, **overrides)
        loss[name] = reliability.log_loss(oof[name], y)
    best = min(loss, key=loss.get)
    base, overrides = candidates[best]
    pipeline = classifiers.make_model(base, k="all", seed=seed, **overrides).fit(X, y)
    return pipeline, oof[best], {"model": best, "oof_log_loss": loss}


def fit(
    data_dir,
    out_dir,
    *,
    colormap: str | None = None,
    size: int = 128,
    progress: bool = False,
    **settings,
) -> dict:
    """Fit a model on a labelled study folder (`fit_model`) and write its directory
    (`save_model`). settings: `fit_model`'s. Returns the model.json dict."""
    train = studies.read_study_folder(data_dir, colormap=colormap, size=size, progress=progress)
    masks = evaluation.load_true_masks(data_dir, [s.name for s in train], size)
    model = fit_model(
        train,
        masks,
        size=size,
        colormap=colormap,
        source=str(data_dir),
        progress=progress,
        **settings,
    )
    save_model(model, out_dir)
    return model.meta


def fit_model(
    train,
    masks: np.ndarray | None = None,
    *,
    model: str = "auto",
    size: int = 128,
    colormap: str | None = None,
    k: float | None = None,
    uncertain_band: tuple[float, float] = DEFAULT_BAND,
    operating_point: str = DEFAULT_OPERATING_POINT,
    unet: bool = False,
    unet_config=None,
    seed: int = 0,
    source: str = "the training studies",
    progress: bool = False,
) -> AnalysisModel:
    """Normal limits, thresholds, label and segment models and the operating point, fitted in
    memory on labelled studies (perfusion.studies.Study); what `fit` saves and what the
    clinical cross-validation fits in each fold.

    masks: (N, 2, S, S) bool true defect masks, or None. model: the label models' classifier
    ("auto": chosen per task by `choose_label_model`). k: blackout threshold in SDs; None
    tunes it by Dice on the masks when given, else keeps ScoreConfig's default.
    operating_point: the rule that sets the abnormal threshold on the out-of-fold calibrated
    probabilities (perfusion.operating_point). source: names the studies in errors.
    """
    low, high = uncertain_band
    if not 0.0 <= low <= 0.5 <= high <= 1.0:
        raise ValueError(f"uncertain band {uncertain_band} must hold 0.5 within [0, 1]")
    parse_rule(operating_point)  # a bad rule fails before minutes of fitting
    if unet and masks is None:
        raise ValueError(f"{source}: --unet needs the true defect masks in masks/<name>.npz")
    labels = np.array([s.label for s in train])
    sexes = [s.sex for s in train]
    stress, rest = stack_uptake(train, size)
    limits, mean, sd = scores.cross_fitted_limits(stress, rest, labels, sexes, seed=seed)
    summary: dict = {
        "n_train": len(train),
        "label_counts": {v: int((labels == v).sum()) for v in LABELS},
    }
    segments_map = geometry.segment_map(size)
    base = ScoreConfig()
    if k is None and masks is not None:
        grid = np.round(np.arange(1.5, 6.01, 0.25), 2)
        lv = geometry.disk_mask(size)
        z = (mean - np.stack([stress, rest], axis=1)) / sd  # (N, 2, S, S)
        dices = [evaluation.pooled_dice((z > kk) & lv, masks) for kk in grid]
        k = float(grid[int(np.argmax(dices))])
        summary["k_dice_train"] = float(max(dices))
    base = dataclasses.replace(base, k=float(k if k is not None else base.k))
    out = scores.score_studies(stress, rest, mean, sd, segments_map, base)
    true_seg = segments_bool([s.segments for s in train])
    true_terr = territories_bool([s.territories for s in train])
    config, tuned = scores.tune_config(out["segment_z"][:, 0], true_seg, true_terr, base=base)
    summary.update({f"{k_}_train": v for k_, v in tuned.items()})

    polar, per_segment = learned_features(stress, rest, mean, sd)
    fitted, calibration, oof_calibrated = {}, {}, {}
    for task in TASK_MODELS:
        idx, y, _ = classifiers.task_targets(labels, task)
        if len(np.unique(y)) < 2 or np.bincount(y).min() < 5:
            raise ValueError(f"{source}: task {task} needs at least 5 studies of each class")
        x = polar[np.ix_(idx, task_columns(task))]
        pipeline, oof, chosen = choose_label_model(x, y, model, seed=seed)
        fitted[task] = classifiers.export_model(pipeline)
        calibration[task] = classifiers.fit_platt(oof, y)
        calibrated = oof_calibrated[task] = classifiers.apply_platt(oof, *calibration[task])
        summary[f"{task}_oof"] = {
            **chosen,
            "accuracy": float(((calibrated > 0.5) == y).mean()),
            "brier": reliability.brier_score(calibrated, y),
            "ece": reliability.expected_calibration_error(calibrated, y),
        }
    # The abnormal threshold is chosen on the same out-of-fold probabilities the calibration
    # was fitted on: the training folder only, each study scored by a model that never saw it.
    chosen_point = choose_operating_point(
        oof_calibrated["abnormal"], labels != "normal", operating_point
    )
    bands = {
        "abnormal": reliability.band_around(chosen_point.threshold, uncertain_band),
        "ischemia_vs_infarction": uncertain_band,
    }
    for task in TASK_MODELS:
        in_band = reliability.in_band(oof_calibrated[task], bands[task])
        summary[f"{task}_oof"]["uncertain_rate"] = float(in_band.mean())
    segment_model, segment_threshold = None, 0.5
    if true_seg.any():
        segment_model, segment_threshold, summary["segments_oof"] = _fit_segment_model(
            per_segment, true_seg, labels, seed=seed
        )
    unet_model = None
    if unet:
        from perfusion import cnn

        unet_model, losses = cnn.train_unet(
            stress,
            rest,
            masks[:, 0],
            masks[:, 1],
            unet_config or cnn.UNetConfig(seed=seed),
            progress=progress,
        )
        summary["unet_final_loss"] = float(np.mean(losses[-20:]))
    meta = {
        "version": MODEL_VERSION,
        "size": size,
        "colormap": colormap,
        "classifier": model,
        "features": list(LABEL_FEATURE_NAMES),
        "task_features": {task: list(names) for task, names in TASK_FEATURES.items()},
        "segment_features": list(scores.SEGMENT_FEATURE_NAMES),
        "score_config": config.to_dict(),
        "calibration": {t: list(ab) for t, ab in calibration.items()},
        "operating_point": chosen_point.to_dict(),
        "segment_threshold": segment_threshold if segment_model is not None else None,
        "uncertain_band": [float(low), float(high)],
        "gate_by_label": True,
        "unet": bool(unet),
        "fit": summary,
    }
    return AnalysisModel(
        size=size,
        limits=limits,
        config=config,
        abnormal=fitted["abnormal"],
        ischemia_vs_infarction=fitted["ischemia_vs_infarction"],
        calibration=calibration,
        segments=segment_model,
        segment_threshold=segment_threshold,
        uncertain_band=(float(low), float(high)),
        operating_point=chosen_point,
        colormap=colormap,
        unet=unet_model,
        meta=meta,
    )


def save_model(model: AnalysisModel, out_dir) -> pathlib.Path:
    """Write a model fitted by `fit_model` as a model directory (see the module docstring)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # model.json goes first and comes back last: a folder half rewritten never loads
    (out_dir / "model.json").unlink(missing_ok=True)
    if model.unet is not None:
        model.unet.save(out_dir / "unet")
    model.limits.save(out_dir / "normal_limits.npz")
    for task in TASK_MODELS:
        getattr(model, task).save(out_dir / f"{task}.npz")
    (out_dir / "segments.npz").unlink(missing_ok=True)
    if model.segments is not None:
        model.segments.save(out_dir / "segments.npz")
    atomic_write_bytes(out_dir / "model.json", json.dumps(model.meta, indent=1).encode())
    seal_model(out_dir)
    return out_dir


def _roles(d: pathlib.Path) -> dict[str, tuple[str, int]]:
    """{file: (role, format version)} of the files a model folder holds now."""
    roles = {
        "model.json": "model description (model.json)",
        "normal_limits.npz": "normal limits",
        "segments.npz": "segment model",
        **{f"{t}.npz": f"{t} model" for t in TASK_MODELS},
    }
    files = {n: (r, MODEL_VERSION) for n, r in roles.items() if (d / n).is_file()}
    for p in sorted((d / "unet").rglob("*")) if (d / "unet").is_dir() else []:
        if p.is_file():
            files[p.relative_to(d).as_posix()] = (f"U-Net file {p.name}", MODEL_VERSION)
    return files


def seal_model(model_dir) -> pathlib.Path:
    """Writes the folder's manifest.json (role, version, sha256 of each file), as `fit` does
    last; on a folder written before manifests, it records the files as they are now."""
    d = pathlib.Path(model_dir)
    if not (d / "model.json").is_file():
        raise FileNotFoundError(f"{d}: no model.json (not a fitted model directory)")
    return integrity.write_manifest(d, _roles(d), kind=MANIFEST_KIND)


def _fit_segment_model(per_segment, true_seg, labels, *, seed: int = 0):
    """Pooled logistic model over (study, segment) rows; its threshold maximises the pooled
    out-of-fold segment F1 over the abnormal training studies (normal calls report none)."""
    n = len(per_segment)
    X = per_segment.reshape(n * scores.NUM_SEGMENTS, -1)
    y = true_seg.reshape(-1).astype(np.int64)
    # folds by study, so a study's 17 rows never straddle training and test
    oof = np.zeros(n * scores.NUM_SEGMENTS)
    fold_of = np.random.default_rng(seed).permutation(n) % 5
    rows_fold = np.repeat(fold_of, scores.NUM_SEGMENTS)
    for f in range(5):
        held = rows_fold == f
        if len(np.unique(y[~held])) < 2:
            continue
        m = classifiers.make_model("logistic", k="all", seed=seed).fit(X[~held], y[~held])
        oof[held] = m.predict_proba(X[held])[:, 1]
    oof = oof.reshape(n, scores.NUM_SEGMENTS)
    abnormal = np.asarray(labels) != "normal"
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    f1 = [scores.segment_f1(oof[abnormal] >= t, true_seg[abnormal])["f1"] for t in grid]
    threshold = float(grid[int(np.argmax(f1))])
    calls = (oof >= threshold) & abnormal[:, None]
    summary = {
        "f1": scores.segment_f1(calls, true_seg)["f1"],
        "territory_exact": float(
            (territories_of(calls) == territories_of(true_seg)).all(axis=1).mean()
        ),
        "threshold": threshold,
    }
    model = classifiers.make_model("logistic", k="all", seed=seed).fit(X, y)
    return classifiers.export_model(model), threshold, summary


def _json_file(path: pathlib.Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return meta


def load_model(model_dir) -> AnalysisModel:
    """Load a model directory written by `fit`; one-line errors name the file at fault."""
    d = pathlib.Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    if not (d / "model.json").is_file():
        raise FileNotFoundError(f"{d}: no model.json (not a fitted model directory, or incomplete)")
    integrity.verify_present(d, kind=MANIFEST_KIND)
    path = d / "model.json"
    meta = _json_file(path)
    version = meta.get("version")
    if version == 1:
        raise ValueError(
            f"{d}: a model folder of version 1 (pickled classifiers, which can run code when "
            "loaded); re-fit it with experiments/perfusion_fit.py"
        )
    if version != MODEL_VERSION:
        raise ValueError(
            f"{path}: version {version!r}, this code reads version {MODEL_VERSION}; re-fit it "
            "with experiments/perfusion_fit.py"
        )

    def field(key, kind: Callable):
        if key not in meta:
            raise ValueError(f"{path}: missing {key!r}; re-fit the model")
        try:
            return kind(meta[key])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: unusable {key!r} ({e}); re-fit the model") from None

    size = field("size", int)
    if size < 8:
        raise ValueError(f"{path}: size {size} is not a polar grid size")
    if list(meta.get("features", [])) != list(LABEL_FEATURE_NAMES):
        raise ValueError(f"{path}: features of another version of the code; re-fit the model")
    limits = scores.NormalLimits.load(d / "normal_limits.npz")
    if limits.size != size:
        raise ValueError(f"{d / 'normal_limits.npz'}: limits of size {limits.size}, not {size}")
    segments = None
    if meta.get("segment_threshold") is not None:
        segments = classifiers.PortableModel.load(d / "segments.npz")
    unet = None
    if meta.get("unet"):
        from perfusion import cnn

        unet = cnn.UNetModel.load(d / "unet")
    abnormal = classifiers.PortableModel.load(d / "abnormal.npz")
    ischemia = classifiers.PortableModel.load(d / "ischemia_vs_infarction.npz")
    config = field("score_config", ScoreConfig.from_dict)
    calibration = field(
        "calibration", lambda c: {t: (float(c[t][0]), float(c[t][1])) for t in TASK_MODELS}
    )
    band = field("uncertain_band", lambda b: (float(b[0]), float(b[1])))
    # Folders fitted before operating points load at 0.5, and their reports say so.
    point = LEGACY
    if "operating_point" in meta:
        point = field("operating_point", OperatingPoint.from_dict)
    # After parsing, so a broken file keeps its own message; before use, so two readable
    # files swapped (each a valid model, silently wrong answers) are refused here.
    loaded = ["model.json", "normal_limits.npz", *(f"{t}.npz" for t in TASK_MODELS)]
    loaded += ["segments.npz"] if segments is not None else []
    versions = dict.fromkeys(loaded, MODEL_VERSION)
    integrity.verify_folder(
        d, kind=MANIFEST_KIND, names=loaded, format_versions=versions, resave=RESAVE
    )
    return AnalysisModel(
        size=size,
        limits=limits,
        config=config,
        abnormal=abnormal,
        ischemia_vs_infarction=ischemia,
        calibration=calibration,
        segments=segments,
        segment_threshold=float(meta.get("segment_threshold") or 0.5),
        uncertain_band=band,
        operating_point=point,
        colormap=meta.get("colormap"),
        gate_by_label=bool(meta.get("gate_by_label", True)),
        unet=unet,
        meta=meta,
    )

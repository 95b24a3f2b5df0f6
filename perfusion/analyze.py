"""Fit and analyze end to end: normal limits, learned models, calibration -> clinical report.

Model directory (written by `fit`, read by `load_model`; model.json is written last, so a
directory without it is incomplete). Nothing in it can run code when loaded: plain arrays in
.npz files read with allow_pickle=False, xgboost's JSON model inside them, JSON for the rest.
  model.json                   version, grid size, colormap, score thresholds, feature names,
                               calibration, segment threshold, abstention band, fit summary
  normal_limits.npz            perfusion.scores.NormalLimits (per sex when enough normals)
  abnormal.npz                 normal vs abnormal on scores.polar_features (PortableModel)
  ischemia_vs_infarction.npz   ischemia vs infarction, the same features
  segments.npz                 per-segment defect model on scores.segment_features (when the
                               training labels list segments)
  unet/                        optional U-Net for the defect mask (msgpack parameters + JSON)

Training studies are scored against cross-fitted limits (a normal study never against limits
that include itself). Probabilities are Platt-calibrated on out-of-fold predictions of the
training folder; a study whose probability falls inside the abstention band is reported as
uncertain, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import zipfile
from collections.abc import Callable

import cv2
import numpy as np

from perfusion import classifiers, geometry, reliability, scores, studies
from perfusion.scores import ScoreConfig
from tavr_jax.fileio import atomic_write_bytes

LABELS = studies.LABELS
MODEL_VERSION = 2
TASK_MODELS = ("abnormal", "ischemia_vs_infarction")
DEFAULT_BAND = (0.25, 0.75)  # abstain when a probability lies in here
CHUNK = 64  # studies analysed at a time: memory stays bounded for any folder size


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
    colormap: str | None = None
    gate_by_label: bool = True
    unet: object | None = None
    meta: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ features


def _stack(studies_list, size: int):
    for s in studies_list:
        if s.stress_uptake.shape != (size, size):
            raise ValueError(
                f"{s.name}: map size {s.stress_uptake.shape} but the model uses {size}"
            )
    stress = np.stack([s.stress_uptake for s in studies_list]).astype(np.float32)
    rest = np.stack([s.rest_uptake for s in studies_list]).astype(np.float32)
    return stress, rest


def _learned_features(stress, rest, mean, sd):
    """(polar (B, F) per study, segment (B, 17, G) per segment) against the given limits."""
    seg = geometry.segment_map(stress.shape[-1])
    return (
        scores.polar_features(stress, rest, mean, sd, seg),
        scores.segment_features(stress, rest, mean, sd, seg),
    )


def load_true_masks(data_dir, names, size: int) -> np.ndarray | None:
    """(N, 2, S, S) bool true defect masks from DATA/masks/<name>.npz, or None if any is missing."""
    out = []
    for n in names:
        p = pathlib.Path(data_dir) / "masks" / f"{n}.npz"
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                m = np.stack([z["stress"], z["rest"]]).astype(np.uint8)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{p}: not a readable mask file ({e})") from None
        if m.shape[-1] != size:
            m = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_NEAREST) for x in m])
        out.append(m.astype(bool))
    return np.stack(out)


def pooled_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice over all pixels of all maps together (1 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    total = p.sum() + t.sum()
    return float(2 * (p & t).sum() / total) if total else 1.0


def _segments_bool(segment_lists) -> np.ndarray:
    out = np.zeros((len(segment_lists), scores.NUM_SEGMENTS), bool)
    for i, segs in enumerate(segment_lists):
        out[i, np.asarray(list(segs), int) - 1] = True
    return out


def _territories_bool(territory_lists) -> np.ndarray:
    return np.array([[t in set(ts) for t in scores.TERRITORY_NAMES] for ts in territory_lists])


def _territories_of(segment_calls: np.ndarray) -> np.ndarray:
    """(B, 3) bool: a territory is involved when any of its segments is a defect."""
    return (segment_calls.astype(np.int32) @ scores.territory_matrix().T) > 0


# ----------------------------------------------------------------------------------- fit


def _oof_probabilities(X, y, name: str, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(class 1) of a feature model on the training folder (for calibration)."""
    fpp = classifiers.feature_fit_predict_proba(X, y, name, k="all", seed=seed)
    return np.asarray(
        classifiers.cross_validate(
            X, y, name, fit_predict_proba=fpp, folds=folds, seed=seed, n_boot=0
        )["oof_probabilities"]
    )[:, 1]


def fit(
    data_dir,
    out_dir,
    *,
    model: str = "logistic",
    size: int = 128,
    colormap: str | None = None,
    k: float | None = None,
    uncertain_band: tuple[float, float] = DEFAULT_BAND,
    unet: bool = False,
    unet_config=None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Fit normal limits, thresholds, the label and segment models on a labelled study folder.

    k: blackout threshold in SDs; None tunes it by Dice on the folder's masks/ when present,
    else keeps ScoreConfig's default. Returns the fit summary also stored in model.json.
    """
    low, high = uncertain_band
    if not 0.0 <= low <= 0.5 <= high <= 1.0:
        raise ValueError(f"uncertain band {uncertain_band} must hold 0.5 within [0, 1]")
    train = studies.read_study_folder(data_dir, colormap=colormap, size=size, progress=progress)
    labels = np.array([s.label for s in train])
    sexes = [s.sex for s in train]
    stress, rest = _stack(train, size)
    limits, mean, sd = scores.cross_fitted_limits(stress, rest, labels, sexes, seed=seed)
    masks = load_true_masks(data_dir, [s.name for s in train], size)
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
        dices = [pooled_dice((z > kk) & lv, masks) for kk in grid]
        k = float(grid[int(np.argmax(dices))])
        summary["k_dice_train"] = float(max(dices))
    base = dataclasses.replace(base, k=float(k if k is not None else base.k))
    out = scores.score_studies(stress, rest, mean, sd, segments_map, base)
    true_seg = _segments_bool([s.segments for s in train])
    true_terr = _territories_bool([s.territories for s in train])
    config, tuned = scores.tune_config(out["segment_z"][:, 0], true_seg, true_terr, base=base)
    summary.update({f"{k_}_train": v for k_, v in tuned.items()})

    polar, per_segment = _learned_features(stress, rest, mean, sd)
    fitted, calibration = {}, {}
    for task in TASK_MODELS:
        idx, y, _ = classifiers.task_targets(labels, task)
        if len(np.unique(y)) < 2 or np.bincount(y).min() < 5:
            raise ValueError(f"{data_dir}: task {task} needs at least 5 studies of each class")
        pipeline = classifiers.make_model(model, k="all", seed=seed).fit(polar[idx], y)
        fitted[task] = classifiers.export_model(pipeline)
        oof = _oof_probabilities(polar[idx], y, model, seed=seed)
        calibration[task] = classifiers.fit_platt(oof, y)
        calibrated = classifiers.apply_platt(oof, *calibration[task])
        summary[f"{task}_oof"] = {
            "accuracy": float(((calibrated > 0.5) == y).mean()),
            "brier": reliability.brier_score(calibrated, y),
            "ece": reliability.expected_calibration_error(calibrated, y),
            "uncertain_rate": float(reliability.in_band(calibrated, uncertain_band).mean()),
        }
    segment_model, segment_threshold = None, 0.5
    if true_seg.any():
        segment_model, segment_threshold, summary["segments_oof"] = _fit_segment_model(
            per_segment, true_seg, labels, seed=seed
        )

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # model.json goes first and comes back last: a folder half rewritten never loads
    (out_dir / "model.json").unlink(missing_ok=True)
    if unet:
        if masks is None:
            raise ValueError(f"{data_dir}: --unet needs the true defect masks in masks/<name>.npz")
        from perfusion import cnn

        unet_model, losses = cnn.train_unet(
            stress,
            rest,
            masks[:, 0],
            masks[:, 1],
            unet_config or cnn.UNetConfig(seed=seed),
            progress=progress,
        )
        unet_model.save(out_dir / "unet")
        summary["unet_final_loss"] = float(np.mean(losses[-20:]))
    limits.save(out_dir / "normal_limits.npz")
    for task, portable in fitted.items():
        portable.save(out_dir / f"{task}.npz")
    (out_dir / "segments.npz").unlink(missing_ok=True)
    if segment_model is not None:
        segment_model.save(out_dir / "segments.npz")
    meta = {
        "version": MODEL_VERSION,
        "size": size,
        "colormap": colormap,
        "classifier": model,
        "features": list(scores.POLAR_FEATURE_NAMES),
        "segment_features": list(scores.SEGMENT_FEATURE_NAMES),
        "score_config": config.to_dict(),
        "calibration": {t: list(ab) for t, ab in calibration.items()},
        "segment_threshold": segment_threshold if segment_model is not None else None,
        "uncertain_band": [float(low), float(high)],
        "gate_by_label": True,
        "unet": bool(unet),
        "fit": summary,
    }
    atomic_write_bytes(out_dir / "model.json", json.dumps(meta, indent=1).encode())
    return meta


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
            (_territories_of(calls) == _territories_of(true_seg)).all(axis=1).mean()
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
    if list(meta.get("features", [])) != list(scores.POLAR_FEATURE_NAMES):
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
    return AnalysisModel(
        size=size,
        limits=limits,
        config=field("score_config", ScoreConfig.from_dict),
        abnormal=classifiers.PortableModel.load(d / "abnormal.npz"),
        ischemia_vs_infarction=classifiers.PortableModel.load(d / "ischemia_vs_infarction.npz"),
        calibration=field(
            "calibration", lambda c: {t: (float(c[t][0]), float(c[t][1])) for t in TASK_MODELS}
        ),
        segments=segments,
        segment_threshold=float(meta.get("segment_threshold") or 0.5),
        uncertain_band=field("uncertain_band", lambda b: (float(b[0]), float(b[1]))),
        colormap=meta.get("colormap"),
        gate_by_label=bool(meta.get("gate_by_label", True)),
        unet=unet,
        meta=meta,
    )


# ------------------------------------------------------------------------------- analyze


def analyze_arrays(model: AnalysisModel, studies_list) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Batched analysis: (report dicts without "file", raw score arrays incl. blackout)."""
    stress, rest = _stack(studies_list, model.size)
    mean, sd = model.limits.stack_for([s.sex for s in studies_list])
    out = scores.score_studies(
        stress, rest, mean, sd, geometry.segment_map(model.size), model.config
    )
    polar, per_segment = _learned_features(stress, rest, mean, sd)
    p_abn = classifiers.apply_platt(
        model.abnormal.predict_proba(polar)[:, 1], *model.calibration["abnormal"]
    )
    p_inf = classifiers.apply_platt(
        model.ischemia_vs_infarction.predict_proba(polar)[:, 1],
        *model.calibration["ischemia_vs_infarction"],
    )
    probs = np.stack([1 - p_abn, p_abn * (1 - p_inf), p_abn * p_inf], axis=1)
    if model.segments is not None:
        b = len(studies_list)
        p_seg = model.segments.predict_proba(per_segment.reshape(b * scores.NUM_SEGMENTS, -1))
        calls = p_seg[:, 1].reshape(b, scores.NUM_SEGMENTS) >= model.segment_threshold
        territories = _territories_of(calls)
    else:  # no segment labels to learn from: the scores' own calls
        calls, territories = out["scores"][:, 0] >= 1, out["territories"]
    reports = []
    for i in range(len(studies_list)):
        label = LABELS[int(np.argmax(probs[i]))]
        defect = [int(q) + 1 for q in np.flatnonzero(calls[i])]
        terr = scores.territory_names(territories[i])
        if model.gate_by_label and label == "normal":
            # The classifier decides normality; its errors are rarer than spurious segments.
            defect, terr = [], []
        reason = reliability.uncertain_reason(
            float(p_abn[i]), float(p_inf[i]) if label != "normal" else None, model.uncertain_band
        )
        s_sc, r_sc = out["scores"][i, 0], out["scores"][i, 1]
        reports.append(
            {
                "label": label,
                "probabilities": {
                    n: round(float(p), 6) for n, p in zip(LABELS, probs[i], strict=True)
                },
                "uncertain": reason is not None,
                "uncertain_reason": reason,
                "stress_scores": [int(v) for v in s_sc],
                "rest_scores": [int(v) for v in r_sc],
                "SSS": int(out["sss"][i]),
                "SRS": int(out["srs"][i]),
                "SDS": int(out["sds"][i]),
                "TPD_stress": round(float(out["tpd"][i, 0]), 3),
                "TPD_rest": round(float(out["tpd"][i, 1]), 3),
                "extent_stress_pct": round(float(out["extent_pct"][i, 0]), 3),
                "defect_segments": defect,
                "territories": terr,
            }
        )
    return reports, out


def analyze_study(model: AnalysisModel, study) -> dict:
    """The report dict of one perfusion.studies.Study (file = its path's name)."""
    report = analyze_arrays(model, [study])[0][0]
    return {"file": pathlib.Path(study.path).name or study.name, **report}


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One entry of an input: a name for the report and how to read its studies."""

    name: str
    read: Callable  # (size, colormap, skipped) -> list[(report name, Study)]


def _is_study_file(p: pathlib.Path) -> bool:
    suffix = p.suffix.lower()
    if suffix in studies.IMAGE_EXTENSIONS or suffix in studies.DICOM_EXTENSIONS:
        return True
    from tavr_jax import dicom

    return suffix == "" and p.is_file() and dicom.is_dicom(p)  # DICOM files often have no suffix


def _file_item(p: pathlib.Path) -> InputItem:
    def read(size, colormap, skipped):
        found = studies.read_study_file(p, colormap=colormap, size=size, skipped=skipped)
        # the frames of a multi-frame DICOM are named <stem>#<frame>: <file>#<frame> here
        return [(p.name + s.name[len(p.stem) :], s) for s in found]

    return InputItem(p.name, read)


def input_items(path) -> list[InputItem]:
    """The entries of a study folder (labels.csv), an image/DICOM folder or one file.

    In a folder, `<name>_stress.<ext>` + `<name>_rest.<ext>` (or -stress / -rest) are a pair.
    Raises for a missing input, an empty folder or an unusable labels.csv; the entries
    themselves are read later, one by one.
    """
    path = pathlib.Path(path)
    if path.is_file():
        return [_file_item(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    if (path / "labels.csv").is_file():
        if not (path / "images").is_dir():
            raise FileNotFoundError(f"{path}: labels.csv without an images/ folder")

        def labelled(rec):
            def read(size, colormap, skipped):
                st = studies.read_labelled_study(path, rec, colormap=colormap, size=size)
                return [(rec["filename"], st)]

            return InputItem(rec["filename"], read)

        return [labelled(rec) for rec in studies.read_labels(path / "labels.csv")]
    images = path / "images" if (path / "images").is_dir() else path
    files = sorted(p for p in images.iterdir() if p.is_file() and _is_study_file(p))
    if not files:
        raise ValueError(
            f"{path}: no images ({', '.join(studies.IMAGE_EXTENSIONS)}) or DICOM files found"
        )
    by_name = {p.name: p for p in files}
    items = []
    for p in files:
        phase = re.fullmatch(r"(.+)([_-])(stress|rest)", p.stem)
        if phase is None:
            items.append(_file_item(p))
            continue
        stem, sep, which = phase.groups()
        partner = by_name.get(f"{stem}{sep}{'rest' if which == 'stress' else 'stress'}{p.suffix}")
        if which == "rest":
            if partner is None:
                items.append(_file_item(p))  # read (and refused) on its own, not dropped
            continue  # else read with its stress partner
        name = f"{stem}{p.suffix}"

        def read(size, colormap, skipped, p=p, partner=partner, name=name):
            if partner is None:
                raise ValueError(f"{p}: stress image without its rest partner")
            return [(name, studies.read_study_pair(p, partner, colormap=colormap, size=size))]

        items.append(InputItem(name, read))
    return items


def analyze_path(
    model_dir,
    input_path,
    out_json,
    *,
    overlay_dir=None,
    metrics_out=None,
    progress: bool = False,
) -> dict:
    """Analyze a file or folder; writes {"studies": [...], "skipped": [...]} atomically.

    Studies are read and analysed CHUNK at a time, so memory does not grow with the folder.
    In a folder, a study that cannot be read is skipped and listed in "skipped" with its
    reason, and the others are still analysed and written; a single file that cannot be read
    raises. overlay_dir: one PNG per study. metrics_out: for a labelled study folder, the
    label, territory and segment metrics, calibration and abstention (and mask Dice when
    masks/ exists) as JSON. Returns the report.
    """
    model = load_model(model_dir)
    input_path = pathlib.Path(input_path)
    labelled = input_path.is_dir() and (input_path / "labels.csv").is_file()
    if metrics_out is not None and not labelled:
        raise FileNotFoundError(f"{input_path}: metrics need a labelled study folder (labels.csv)")
    items = input_items(input_path)
    single = input_path.is_file()
    rows, skipped = [], []
    dice = _DiceSums() if metrics_out is not None and (input_path / "masks").is_dir() else None
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"analysing {input_path}", unit="study")
    for chunk in chunks:
        found, names = [], []
        for item in chunk:
            frames_skipped = []
            try:
                for name, study in item.read(model.size, model.colormap, frames_skipped):
                    found.append(study)
                    names.append(name)
            except (ValueError, OSError) as e:
                if single:
                    raise
                skipped.append({"file": item.name, "reason": str(e)})
            skipped += [{"file": f, "reason": r} for f, r in frames_skipped]
            if bar is not None:
                bar.update()
        if not found:
            continue
        reports, out = analyze_arrays(model, found)
        reports = [{"file": n, **r} for n, r in zip(names, reports, strict=True)]
        rows += reports
        if overlay_dir is not None:
            write_overlays(overlay_dir, found, names, reports, out["blackout"])
        if dice is not None:
            dice.add(model, input_path, found, out["blackout"])
    if bar is not None:
        bar.close()
    if single and skipped:  # a DICOM file's frames: the file was asked for, so it fails
        raise ValueError(f"{skipped[0]['file']}: {skipped[0]['reason']}")
    report = {"studies": rows, "skipped": skipped}
    out_json = pathlib.Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_json, json.dumps(report, indent=1).encode())
    if metrics_out is not None:
        metrics = evaluate_report(report, input_path / "labels.csv")
        if dice is not None:
            metrics["dice"] = dice.summary()
        atomic_write_bytes(metrics_out, json.dumps(metrics, indent=1).encode())
    return report


# ------------------------------------------------------------------------------- overlay


def draw_overlay(study, report: dict, blackout: np.ndarray, *, scale: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 RGB: stress and rest maps, blackout hatched, 17-segment grid, numbers."""
    size = study.stress_rgb.shape[0]
    big = size * scale
    tiles = []
    for phase, rgb in enumerate((study.stress_rgb, study.rest_rgb)):
        img = cv2.resize(rgb, (big, big), interpolation=cv2.INTER_NEAREST).copy()
        bo = cv2.resize(
            blackout[phase].astype(np.uint8), (big, big), interpolation=cv2.INTER_NEAREST
        )
        # Blackout: darkened and outlined, so the colours underneath stay readable.
        img[bo > 0] = (img[bo > 0] * 0.35).astype(np.uint8)
        contours, _ = cv2.findContours(bo, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, (255, 255, 255), 1, cv2.LINE_AA)
        _draw_segment_grid(img)
        title = "STRESS" if phase == 0 else "REST"
        canvas = np.zeros((big + 30, big, 3), np.uint8)
        canvas[30:] = img
        cv2.putText(
            canvas, title, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (230, 230, 230), 1, cv2.LINE_AA
        )
        tiles.append(canvas)
    gap = np.zeros((big + 30, 10, 3), np.uint8)
    out = np.concatenate([tiles[0], gap, tiles[1]], axis=1)
    footer = np.zeros((40, out.shape[1], 3), np.uint8)
    text1 = f"{report['label']}  SSS {report['SSS']}  SRS {report['SRS']}  SDS {report['SDS']}"
    territories = "+".join(report["territories"]) or "-"
    text2 = f"TPD {report['TPD_stress']:.1f}% / {report['TPD_rest']:.1f}%  {territories}"
    for j, t in enumerate((text1, text2)):
        cv2.putText(
            footer,
            t,
            (4, 15 + 18 * j),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (230, 230, 230),
            1,
            cv2.LINE_AA,
        )
    return np.concatenate([out, footer], axis=0)


def _draw_segment_grid(img: np.ndarray) -> None:
    """Ring circles, sector lines and AHA numbers on a (S, S, 3) canonical map, in place."""
    size = img.shape[0]
    c, radius = size / 2.0, size / 2.0
    white = (255, 255, 255)

    def pt(r, deg):  # polar (radius fraction, angle ccw from +x, up = -row) -> pixel
        a = np.radians(deg)
        return int(round(c + r * radius * np.cos(a))), int(round(c - r * radius * np.sin(a)))

    for r in geometry.RING_RADII:
        cv2.circle(
            img, (int(round(c)), int(round(c))), int(round(r * radius)), white, 1, cv2.LINE_AA
        )
    for deg in range(60, 420, 60):  # basal and mid: six sectors from 60 deg
        cv2.line(img, pt(geometry.APICAL_RADIUS, deg), pt(1.0, deg), white, 1, cv2.LINE_AA)
    for deg in (45, 135, 225, 315):  # apical: four sectors centred on 90, 180, 270, 0
        cv2.line(
            img,
            pt(geometry.APEX_RADIUS, deg),
            pt(geometry.APICAL_RADIUS, deg),
            white,
            1,
            cv2.LINE_AA,
        )
    scale = size / 128 * 0.4
    for k, (x, y) in enumerate(geometry.segment_centroids(size), start=1):
        text = str(k)
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        org = (int(round(x - w / 2)), int(round(y + h / 2)))
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, white, 1, cv2.LINE_AA)


def overlay_name(name: str) -> str:
    """The overlay file of a report entry: its file name, with .png added unless it has it
    (so a.jpg and a.png do not overwrite each other's overlay)."""
    return name if name.lower().endswith(".png") else f"{name}.png"


def write_overlays(overlay_dir, found, names, reports, blackout) -> list[pathlib.Path]:
    """One PNG per study (atomic), named after the report's file (`overlay_name`)."""
    d = pathlib.Path(overlay_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (study, name, rep) in enumerate(zip(found, names, reports, strict=True)):
        image = draw_overlay(study, rep, blackout[i])
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f"could not encode the overlay of {name}")
        p = d / overlay_name(name)
        atomic_write_bytes(p, buf.tobytes())
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------- evaluation


def evaluate_report(report: dict, labels_csv) -> dict:
    """Metrics of a report against labels.csv: label, territory (exact set, per territory)
    and segment accuracy; calibration and abstention of the probabilities; skipped count."""
    truth = {r["filename"]: r for r in studies.read_labels(labels_csv)}
    rows = report["studies"]
    missing = [r["file"] for r in rows if r["file"] not in truth]
    if missing:
        raise ValueError(f"{labels_csv}: no labels for {missing[:3]}")
    t = [truth[r["file"]] for r in rows]
    pred_terr = _territories_bool([r["territories"] for r in rows])
    true_terr = _territories_bool([x["territories"] for x in t])
    seg = scores.segment_f1(
        _segments_bool([r["defect_segments"] for r in rows]),
        _segments_bool([x["segments"] for x in t]),
    )
    labels_true = np.array([x["label"] for x in t])
    labels_pred = np.array([r["label"] for r in rows])
    abnormal = labels_true != "normal"
    both = abnormal & (labels_pred != "normal")
    certain = np.array([not r.get("uncertain", False) for r in rows], bool)
    p_abn = np.array([1.0 - r["probabilities"]["normal"] for r in rows])
    # P(infarction | abnormal) of the truly abnormal studies
    p_inf = np.array(
        [
            r["probabilities"]["infarction"] / max(1.0 - r["probabilities"]["normal"], 1e-9)
            for r in rows
        ]
    )

    def mean_or_none(x):
        return float(np.mean(x)) if len(x) else None

    pred_seg = _segments_bool([r["defect_segments"] for r in rows])
    true_seg = _segments_bool([x["segments"] for x in t])
    per_study = {  # per-study outcomes the bootstrap resamples
        "label_accuracy": (labels_true == labels_pred).astype(float),
        "abnormal_accuracy": (abnormal == (labels_pred != "normal")).astype(float),
        "ischemia_vs_infarction_accuracy": np.where(both, labels_true == labels_pred, np.nan),
        "territory_exact_accuracy": (pred_terr == true_terr).all(axis=1).astype(float),
    }
    counts = np.stack(
        [
            (pred_seg & true_seg).sum(1),
            (pred_seg & ~true_seg).sum(1),
            (~pred_seg & true_seg).sum(1),
        ],
        axis=1,
    )  # (N, 3) tp, fp, fn
    return {
        "n": len(rows),
        "skipped": len(report.get("skipped", [])),
        "label_accuracy": mean_or_none(labels_true == labels_pred),
        "abnormal_accuracy": mean_or_none(abnormal == (labels_pred != "normal")),
        "ischemia_vs_infarction_accuracy": mean_or_none(labels_true[both] == labels_pred[both]),
        "territory_exact_accuracy": mean_or_none((pred_terr == true_terr).all(axis=1)),
        "territory_accuracy": {
            n: mean_or_none(pred_terr[:, j] == true_terr[:, j])
            for j, n in enumerate(scores.TERRITORY_NAMES)
        },
        "segment": seg,
        "ci95": _bootstrap_ci(per_study, counts),
        "uncertain_rate": mean_or_none(~certain),
        "certain": {
            "label_accuracy": mean_or_none((labels_true == labels_pred)[certain]),
            "abnormal_accuracy": mean_or_none((abnormal == (labels_pred != "normal"))[certain]),
        },
        "calibration": {
            "abnormal": _calibration(p_abn, abnormal),
            "ischemia_vs_infarction": _calibration(
                p_inf[abnormal], labels_true[abnormal] == "infarction"
            ),
        },
    }


def _bootstrap_ci(per_study: dict, segment_counts, *, n_boot: int = 1000, seed: int = 0):
    """95% percentile intervals over studies resampled with replacement: each per-study
    metric (nan = not counted) and the pooled segment F1 from per-study (tp, fp, fn)."""
    n = len(segment_counts)
    if n == 0:
        return {}
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    out = {}
    for name, values in per_study.items():
        v = values[idx]
        counted = ~np.isnan(v)
        total, k = np.where(counted, v, 0.0).sum(axis=1), counted.sum(axis=1)
        means = total[k > 0] / k[k > 0]
        out[name] = np.quantile(means, [0.025, 0.975]).tolist() if len(means) else None
    tp, fp, fn = segment_counts[idx].sum(axis=1).T
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    out["segment_f1"] = np.quantile(f1, [0.025, 0.975]).tolist()
    return out


def _calibration(p, y) -> dict:
    return {
        "n": int(len(p)),
        "brier": reliability.brier_score(p, y),
        "ece": reliability.expected_calibration_error(p, y),
        "reliability": reliability.reliability_bins(p, y),
        "abstention": reliability.abstention_curve(p, y),
    }


class _DiceSums:
    """Mask Dice against masks/, accumulated chunk by chunk: pooled sums and per-study values
    for the normal-limits blackout and, when the model has one, the U-Net mask."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.per_study: dict[str, list] = {}
        self.abnormal: list = []
        self.missing = False

    def add(self, model, data_dir, found, blackout) -> None:
        masks = load_true_masks(data_dir, [s.name for s in found], model.size)
        if masks is None:
            self.missing = True
            return
        self.abnormal += list(masks.reshape(len(masks), -1).any(axis=1))
        preds = {"normal_limits": blackout}
        if model.unet is not None:
            from perfusion import cnn

            preds["unet"] = cnn.predict_mask(model.unet, *_stack(found, model.size))
        from perfusion.cnn import dice

        for name, pred in preds.items():
            inter = (pred & masks).sum(axis=(-2, -1)).sum(0)  # (2,) stress, rest
            total = (pred.sum(axis=(-2, -1)) + masks.sum(axis=(-2, -1))).sum(0)
            self.sums[name] = self.sums.get(name, 0) + np.stack([inter, total])
            self.per_study.setdefault(name, []).extend(dice(pred, masks)[:, 0])

    def summary(self) -> dict:
        if self.missing:
            return {"error": "some studies have no masks/<name>.npz"}
        abnormal = np.asarray(self.abnormal, bool)
        out = {}
        for name, (inter, total) in self.sums.items():
            pooled = [float(2 * i / t) if t else 1.0 for i, t in zip(inter, total, strict=True)]
            per = np.asarray(self.per_study[name])
            out[name] = {
                "pooled_stress": pooled[0],
                "pooled_rest": pooled[1],
                "mean_stress_abnormal": float(per[abnormal].mean()) if abnormal.any() else None,
            }
        return out

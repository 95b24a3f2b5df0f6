"""Fit and analyze end to end: classifiers + normal limits + tuned thresholds -> clinical report.

Model directory (written by `fit`, read by `load_model`; model.json is written last, so a
directory without it is incomplete):
  model.json            sizes, score thresholds, classifier names, feature names, fit summary
  normal_limits.npz     perfusion.scores.NormalLimits
  abnormal.joblib       normal vs abnormal pipeline (F-test top k + model) on study features
  ischemia_vs_infarction.joblib
  unet/                 optional U-Net for the defect mask (fit with unet=True and masks/)

Study features for the classifiers: the 252 strip/ring features (stress, rest, difference)
plus the normal-limits quantities below (SCORE_FEATURES). For training studies these come from
cross-fitted limits (a normal study is never scored against limits that include itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import cv2
import joblib
import numpy as np

from perfusion import classifiers, features, geometry, scores, studies
from perfusion.scores import ScoreConfig
from tavr_jax.fileio import atomic_write_bytes

LABELS = studies.LABELS
MODEL_VERSION = 1
SCORE_FEATURES = (
    "sss", "srs", "sds", "tpd_stress", "tpd_rest", "extent_stress", "extent_rest",
    "tpd_difference", "z_sum_stress", "z_sum_rest", "z_rest_over_stress", "max_territory_score",
)  # fmt: skip


@dataclasses.dataclass
class AnalysisModel:
    """Everything `analyze_study` needs, as loaded from a model directory."""

    size: int
    limits: scores.NormalLimits
    config: ScoreConfig
    abnormal: object  # fitted sklearn pipeline
    ischemia_vs_infarction: object
    colormap: str | None = None
    gate_by_label: bool = True
    unet: object | None = None
    meta: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ features


def _score_batch(stress, rest, mean, sd, config: ScoreConfig) -> dict[str, np.ndarray]:
    return scores.score_studies(
        stress, rest, mean, sd, geometry.segment_map(stress.shape[-1]), config
    )


def score_feature_matrix(out: dict[str, np.ndarray]) -> np.ndarray:
    """(B, len(SCORE_FEATURES)) float32 from `scores.score_studies` output."""
    zpos = np.maximum(out["segment_z"], 0.0).sum(axis=-1)  # (B, 2)
    cols = [
        out["sss"], out["srs"], out["sds"], out["tpd"][:, 0], out["tpd"][:, 1],
        out["extent_pct"][:, 0], out["extent_pct"][:, 1], out["tpd"][:, 0] - out["tpd"][:, 1],
        zpos[:, 0], zpos[:, 1], zpos[:, 1] / (zpos[:, 0] + 1.0), out["territory_score"].max(-1),
    ]  # fmt: skip
    return np.stack([np.asarray(c, np.float32) for c in cols], axis=1)


def _stack(studies_list, size: int):
    for s in studies_list:
        if s.stress_uptake.shape != (size, size):
            raise ValueError(
                f"{s.name}: map size {s.stress_uptake.shape} but the model uses {size}"
            )
    stress = np.stack([s.stress_uptake for s in studies_list]).astype(np.float32)
    rest = np.stack([s.rest_uptake for s in studies_list]).astype(np.float32)
    return stress, rest


def _cross_fitted_limits(stress, rest, labels, sexes, *, folds: int = 5, seed: int = 0):
    """Per-study (mean, sd) (N, 2, S, S): normals scored against limits fitted without them."""
    normal = np.flatnonzero(np.asarray(labels) == "normal")
    if len(normal) < 4:
        raise ValueError(f"need at least 4 normal studies for normal limits, got {len(normal)}")
    full = scores.fit_normal_limits(stress[normal], rest[normal], sex=[sexes[i] for i in normal])
    mean, sd = full.stack_for(sexes)
    fold_of = np.random.default_rng(seed).permutation(len(normal)) % min(folds, len(normal) // 2)
    for f in np.unique(fold_of):
        keep, held = normal[fold_of != f], normal[fold_of == f]
        lim = scores.fit_normal_limits(stress[keep], rest[keep], sex=[sexes[i] for i in keep])
        mean[held], sd[held] = lim.stack_for([sexes[i] for i in held])
    return full, mean, sd


def load_true_masks(data_dir, names, size: int) -> np.ndarray | None:
    """(N, 2, S, S) bool true defect masks from DATA/masks/<name>.npz, or None if any is missing."""
    out = []
    for n in names:
        p = pathlib.Path(data_dir) / "masks" / f"{n}.npz"
        if not p.is_file():
            return None
        with np.load(p) as z:
            m = np.stack([z["stress"], z["rest"]]).astype(np.uint8)
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


# ----------------------------------------------------------------------------------- fit


def fit(
    data_dir,
    out_dir,
    *,
    model: str = "rf",
    size: int = 128,
    colormap: str | None = None,
    k: float | None = None,
    unet: bool = False,
    unet_config=None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Fit classifiers, normal limits and thresholds on a labelled study folder; save them.

    k: blackout threshold in SDs; None tunes it by Dice on the folder's masks/ when present,
    else keeps ScoreConfig's default. Returns the fit summary also stored in model.json.
    """
    train = studies.read_study_folder(data_dir, colormap=colormap, size=size, progress=progress)
    labels = np.array([s.label for s in train])
    sexes = [s.sex for s in train]
    stress, rest = _stack(train, size)
    limits, mean, sd = _cross_fitted_limits(stress, rest, labels, sexes, seed=seed)
    masks = load_true_masks(data_dir, [s.name for s in train], size)
    summary: dict = {
        "n_train": len(train),
        "label_counts": {v: int((labels == v).sum()) for v in LABELS},
    }
    base = ScoreConfig()
    if k is None and masks is not None:
        grid = np.round(np.arange(1.5, 6.01, 0.25), 2)
        lv = geometry.disk_mask(size)
        z = (mean - np.stack([stress, rest], axis=1)) / sd  # (N, 2, S, S)
        dices = [pooled_dice((z > kk) & lv, masks) for kk in grid]
        k = float(grid[int(np.argmax(dices))])
        summary["k_dice_train"] = float(max(dices))
    base = dataclasses.replace(base, k=float(k if k is not None else base.k))
    out = _score_batch(stress, rest, mean, sd, base)
    true_seg = _segments_bool([s.segments for s in train])
    true_terr = _territories_bool([s.territories for s in train])
    config, tuned = scores.tune_config(out["segment_z"][:, 0], true_seg, true_terr, base=base)
    summary.update({f"{k_}_train": v for k_, v in tuned.items()})
    out = _score_batch(stress, rest, mean, sd, config)
    X = np.concatenate([features.study_feature_matrix(train), score_feature_matrix(out)], axis=1)

    idx_a, y_a, _ = classifiers.task_targets(labels, "abnormal")
    idx_t, y_t, _ = classifiers.task_targets(labels, "ischemia_vs_infarction")
    for name, y in (("abnormal", y_a), ("ischemia_vs_infarction", y_t)):
        if len(np.unique(y)) < 2:
            raise ValueError(f"{data_dir}: task {name} needs both classes in the training labels")
    clf_a = classifiers.make_model(model, seed=seed).fit(X[idx_a], y_a)
    clf_t = classifiers.make_model(model, seed=seed).fit(X[idx_t], y_t)

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if unet:
        if masks is None:
            raise ValueError(f"{data_dir}: --unet needs the true defect masks in masks/<name>.npz")
        from perfusion import cnn

        unet_model, losses = cnn.train_unet(
            stress, rest, masks[:, 0], masks[:, 1], unet_config or cnn.UNetConfig(seed=seed),
            progress=progress,
        )  # fmt: skip
        unet_model.save(out_dir / "unet")
        summary["unet_final_loss"] = float(np.mean(losses[-20:]))
    limits.save(out_dir / "normal_limits.npz")
    for name, clf in (("abnormal", clf_a), ("ischemia_vs_infarction", clf_t)):
        tmp = out_dir / f".{name}.joblib.tmp"
        joblib.dump(clf, tmp)
        os.replace(tmp, out_dir / f"{name}.joblib")
    meta = {
        "version": MODEL_VERSION,
        "size": size,
        "colormap": colormap,
        "classifier": model,
        "features": list(features.STUDY_FEATURE_NAMES) + list(SCORE_FEATURES),
        "score_config": config.to_dict(),
        "gate_by_label": True,
        "unet": bool(unet),
        "fit": summary,
    }
    atomic_write_bytes(out_dir / "model.json", json.dumps(meta, indent=1).encode())
    return meta


def load_model(model_dir) -> AnalysisModel:
    """Load a model directory written by `fit` (clear error when missing or incomplete)."""
    d = pathlib.Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    if not (d / "model.json").is_file():
        raise FileNotFoundError(f"{d}: no model.json (not a fitted model directory, or incomplete)")
    meta = json.loads((d / "model.json").read_text())
    if meta.get("version") != MODEL_VERSION:
        raise ValueError(f"{d}/model.json: version {meta.get('version')}, expected {MODEL_VERSION}")
    clfs = {}
    for name in ("abnormal", "ischemia_vs_infarction"):
        p = d / f"{name}.joblib"
        if not p.is_file():
            raise FileNotFoundError(f"{d}: missing {p.name}")
        clfs[name] = joblib.load(p)
    unet = None
    if meta.get("unet"):
        from perfusion import cnn

        unet = cnn.UNetModel.load(d / "unet")
    return AnalysisModel(
        size=int(meta["size"]),
        limits=scores.NormalLimits.load(d / "normal_limits.npz"),
        config=ScoreConfig.from_dict(meta["score_config"]),
        abnormal=clfs["abnormal"],
        ischemia_vs_infarction=clfs["ischemia_vs_infarction"],
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
    out = _score_batch(stress, rest, mean, sd, model.config)
    X = np.concatenate(
        [features.study_feature_matrix(studies_list), score_feature_matrix(out)], axis=1
    )
    p_abn = model.abnormal.predict_proba(X)[:, 1]
    p_inf = model.ischemia_vs_infarction.predict_proba(X)[:, 1]
    probs = np.stack([1 - p_abn, p_abn * (1 - p_inf), p_abn * p_inf], axis=1)
    reports = []
    for i in range(len(studies_list)):
        label = LABELS[int(np.argmax(probs[i]))]
        s_sc, r_sc = out["scores"][i, 0], out["scores"][i, 1]
        defect = [int(q) + 1 for q in np.flatnonzero(s_sc >= 1)]
        terr = scores.territory_names(out["territories"][i])
        if model.gate_by_label and label == "normal":
            # The classifier decides normality; its errors are rarer than spurious segments.
            defect, terr = [], []
        reports.append(
            {
                "label": label,
                "probabilities": {
                    n: round(float(p), 6) for n, p in zip(LABELS, probs[i], strict=True)
                },
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
    return {"file": os.path.basename(study.path) or study.name, **report}


def read_input(path, *, size: int, colormap=None, progress: bool = False):
    """Studies and their report file names from a study folder, an image folder or one image."""
    path = pathlib.Path(path)
    if path.is_file():
        return [studies.read_study_image(path, colormap=colormap, size=size)], [path.name]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    if (path / "labels.csv").is_file():
        rows = studies.read_labels(path / "labels.csv")
        found = studies.read_study_folder(path, colormap=colormap, size=size, progress=progress)
        return found, [r["filename"] for r in rows]
    images = path / "images" if (path / "images").is_dir() else path
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in studies.IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(studies.IMAGE_EXTENSIONS)}) found")
    by_name = {p.name: p for p in files}
    out, names = [], []
    for p in files:
        stem = p.stem
        if stem.endswith(("_rest", "-rest")):
            continue  # read with its stress partner
        if stem.endswith(("_stress", "-stress")):
            partner = by_name.get(f"{stem[:-7]}{stem[-7]}rest{p.suffix}")  # same separator
            if partner is None:
                raise ValueError(f"{p}: stress image without its rest partner")
            out.append(studies.read_study_pair(p, partner, colormap=colormap, size=size))
            names.append(f"{stem[:-7]}{p.suffix}")
            continue
        out.append(studies.read_study_image(p, colormap=colormap, size=size))
        names.append(p.name)
    return out, names


def analyze_path(
    model_dir,
    input_path,
    out_json,
    *,
    overlay_dir=None,
    metrics_out=None,
    progress: bool = False,
) -> dict:
    """Analyze a file or folder and write {"studies": [...]} atomically; returns the report.

    overlay_dir: one PNG per study. metrics_out: for a labelled study folder, the accuracy,
    territory and segment metrics (and mask Dice when masks/ exists) as JSON.
    """
    model = load_model(model_dir)
    if metrics_out is not None and not (pathlib.Path(input_path) / "labels.csv").is_file():
        raise FileNotFoundError(f"{input_path}: metrics need a labelled study folder (labels.csv)")
    found, names = read_input(
        input_path, size=model.size, colormap=model.colormap, progress=progress
    )
    reports, blackout = [], []
    for start in range(0, len(found), 64):
        r, out = analyze_arrays(model, found[start : start + 64])
        reports += r
        blackout.append(out["blackout"])
    reports = [{"file": name, **rep} for rep, name in zip(reports, names, strict=True)]
    report = {"studies": reports}
    out_json = pathlib.Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_json, json.dumps(report, indent=1).encode())
    if overlay_dir is not None:
        write_overlays(overlay_dir, found, names, reports, np.concatenate(blackout))
    if metrics_out is not None:
        data_dir = pathlib.Path(input_path)
        metrics = evaluate_report(report, data_dir / "labels.csv")
        if (data_dir / "masks").is_dir():
            metrics["dice"] = compare_masks(model, data_dir, found)
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


def write_overlays(overlay_dir, found, names, reports, blackout) -> list[pathlib.Path]:
    """One PNG per study (atomic), named after the report's file."""
    d = pathlib.Path(overlay_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (study, name, rep) in enumerate(zip(found, names, reports, strict=True)):
        image = draw_overlay(study, rep, blackout[i])
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f"could not encode the overlay of {name}")
        p = d / f"{pathlib.Path(name).stem}.png"
        atomic_write_bytes(p, buf.tobytes())
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------- evaluation


def evaluate_report(report: dict, labels_csv) -> dict:
    """Label accuracy, territory accuracy (exact set, per territory), segment F1 vs labels.csv."""
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
    return {
        "n": len(rows),
        "label_accuracy": float((labels_true == labels_pred).mean()),
        "abnormal_accuracy": float(((labels_true != "normal") == (labels_pred != "normal")).mean()),
        "ischemia_vs_infarction_accuracy": float((labels_true[both] == labels_pred[both]).mean())
        if both.any()
        else None,
        "territory_exact_accuracy": float((pred_terr == true_terr).all(axis=1).mean()),
        "territory_accuracy": {
            n: float((pred_terr[:, j] == true_terr[:, j]).mean())
            for j, n in enumerate(scores.TERRITORY_NAMES)
        },
        "segment": seg,
    }


def compare_masks(model: AnalysisModel, data_dir, found) -> dict:
    """Dice vs the true masks/ of the normal-limits blackout and (if fitted) the U-Net mask."""
    masks = load_true_masks(data_dir, [s.name for s in found], model.size)
    if masks is None:
        raise ValueError(f"{data_dir}: no true masks (masks/<name>.npz) to compare with")
    _, out = analyze_arrays(model, found)
    abnormal = masks.reshape(len(masks), -1).any(axis=1)
    result = {"normal_limits": _dice_summary(out["blackout"], masks, abnormal)}
    if model.unet is not None:
        from perfusion import cnn

        stress, rest = _stack(found, model.size)
        result["unet"] = _dice_summary(cnn.predict_mask(model.unet, stress, rest), masks, abnormal)
    return result


def _dice_summary(pred, true, abnormal) -> dict:
    from perfusion.cnn import dice

    per = dice(pred, true)  # (N, 2)
    return {
        "pooled_stress": pooled_dice(pred[:, 0], true[:, 0]),
        "pooled_rest": pooled_dice(pred[:, 1], true[:, 1]),
        "mean_stress_abnormal": float(per[abnormal, 0].mean()) if abnormal.any() else None,
    }

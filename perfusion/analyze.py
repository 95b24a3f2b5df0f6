"""Analyze end to end: read studies, apply a fitted model, write the clinical report.

`fit` and `load_model` (perfusion.fitting) make and read the model directory; this module
applies it: normal limits -> scores, blackout, calibrated label probabilities, the
normal-vs-abnormal call at the model's operating point, defect segments and territories per
study, and a study whose probability falls inside the abstention band is reported as
uncertain, with the reason. Folders are read and analysed in chunks, unreadable studies are
skipped and listed; overlays draw the blackout on the 17-segment grid.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable

import cv2
import numpy as np

from cardiac_core.fileio import atomic_write_bytes
from perfusion import classifiers, evaluation, geometry, reliability, scores, studies
from perfusion.fitting import (  # the entry points of the model directory, offered here too
    TASK_MODELS,
    AnalysisModel,
    fit,
    learned_features,
    load_model,
    stack_uptake,
    task_columns,
)

__all__ = [
    "TASK_MODELS",
    "AnalysisModel",
    "fit",
    "load_model",
    "analyze_arrays",
    "analyze_study",
    "analyze_path",
    "input_items",
    "draw_overlay",
    "write_overlays",
    "overlay_name",
]

LABELS = studies.LABELS
CHUNK = 64  # studies analysed at a time: memory stays bounded for any folder size


# ------------------------------------------------------------------------------- analyze


def analyze_arrays(model: AnalysisModel, studies_list) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Batched analysis: (report dicts without "file", raw score arrays incl. blackout)."""
    stress, rest = stack_uptake(studies_list, model.size)
    mean, sd = model.limits.stack_for([s.sex for s in studies_list])
    out = scores.score_studies(
        stress, rest, mean, sd, geometry.segment_map(model.size), model.config
    )
    polar, per_segment = learned_features(stress, rest, mean, sd)
    p_abn, p_inf = (
        classifiers.apply_platt(
            getattr(model, task).predict_proba(polar[:, task_columns(task)])[:, 1],
            *model.calibration[task],
        )
        for task in TASK_MODELS
    )
    probs = np.stack([1 - p_abn, p_abn * (1 - p_inf), p_abn * p_inf], axis=1)
    # The call is made at the model's operating point, not at the most probable label: a
    # sensitivity-first threshold calls abnormal studies whose p(normal) is still the largest.
    point = model.operating_point
    abnormal = p_abn >= point.threshold
    abnormal_band = reliability.band_around(point.threshold, model.uncertain_band)
    territory_p = None
    if model.segments is not None:
        b = len(studies_list)
        p_seg = model.segments.predict_proba(per_segment.reshape(b * scores.NUM_SEGMENTS, -1))
        p_seg = p_seg[:, 1].reshape(b, scores.NUM_SEGMENTS)
        calls = p_seg >= model.segment_threshold
        territories = evaluation.territories_of(calls)
        # a territory is called when its most probable segment reaches the threshold
        territory_p = evaluation.per_territory(p_seg, "max")
    else:  # no segment labels to learn from: the scores' own calls
        calls, territories = out["scores"][:, 0] >= 1, out["territories"]
    reports = []
    for i in range(len(studies_list)):
        label = "normal" if not abnormal[i] else ("infarction" if p_inf[i] > 0.5 else "ischemia")
        defect = [int(q) + 1 for q in np.flatnonzero(calls[i])]
        terr = scores.territory_names(territories[i])
        if model.gate_by_label and label == "normal":
            # The classifier decides normality; its errors are rarer than spurious segments.
            defect, terr = [], []
        reason = reliability.uncertain_reason(
            float(p_abn[i]),
            float(p_inf[i]) if label != "normal" else None,
            model.uncertain_band,
            abnormal_band=abnormal_band,
        )
        s_sc, r_sc = out["scores"][i, 0], out["scores"][i, 1]
        terr_p = None
        if territory_p is not None:
            named = zip(scores.TERRITORY_NAMES, territory_p[i], strict=True)
            terr_p = {n: round(float(v), 6) for n, v in named}
        reports.append(
            {
                "label": label,
                "probabilities": {
                    n: round(float(p), 6) for n, p in zip(LABELS, probs[i], strict=True)
                },
                "decision": {
                    "abnormal": bool(abnormal[i]),
                    "abnormal_probability": round(float(p_abn[i]), 6),
                    "threshold": round(point.threshold, 6),
                    "operating_point": point.rule,
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
                "territory_probabilities": terr_p,
                # of the disk drawn over in the image (grid, scores, a cursor) and filled
                "masked_fraction": round(float(studies_list[i].masked_fraction), 3),
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
    from cardiac_core import dicom

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
    dice = DiceSums() if metrics_out is not None and (input_path / "masks").is_dir() else None
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
        metrics = evaluation.evaluate_report(report, input_path / "labels.csv")
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
    for inner, outer, deg in geometry.segment_grid_lines():
        cv2.line(img, pt(inner, deg), pt(outer, deg), white, 1, cv2.LINE_AA)
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


# ---------------------------------------------------------------------------- mask Dice


class DiceSums:
    """Mask Dice against masks/, accumulated chunk by chunk: pooled sums and per-study values
    for the normal-limits blackout and, when the model has one, the U-Net mask."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.per_study: dict[str, list] = {}
        self.abnormal: list = []
        self.missing = False

    def add(self, model, data_dir, found, blackout) -> None:
        masks = evaluation.load_true_masks(data_dir, [s.name for s in found], model.size)
        if masks is None:
            self.missing = True
            return
        self.abnormal += list(masks.reshape(len(masks), -1).any(axis=1))
        preds = {"normal_limits": blackout}
        if model.unet is not None:
            from perfusion import cnn

            preds["unet"] = cnn.predict_mask(model.unet, *stack_uptake(found, model.size))
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

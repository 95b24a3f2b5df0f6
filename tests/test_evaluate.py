"""The paper's metrics against a plain Python loop and hand-computed cases; threshold tuning."""

import json
import math
import pathlib

import numpy as np
import pytest

from tavr_jax import evaluate
from tavr_jax.schema import KeypointSchema, get_schema

SCHEMA = get_schema("paper11")
TINY = KeypointSchema(name="tiny", groups=(("a", ("P", "Q")), ("b", ("R",))))


def _loop_reference(prob, pxy, vis, txy, schema, thr, gprob, gthr, dist_px, spacing):
    """Independent reference: one Python loop over (image, point) pairs."""
    n, k = prob.shape
    groups = [g for g, pts in schema.groups for _ in pts]
    gidx = {g: i for i, g in enumerate(schema.group_names)}

    def new():
        return dict(tp=0, fp=0, fn=0, d=[], mm=[])

    pooled, per_point, per_group, per_image = new(), [new() for _ in range(k)], {}, []
    for g in schema.group_names:
        per_group[g] = new()
    for i in range(n):
        img = new()
        for j in range(k):
            p = prob[i, j] > thr[j]
            if gprob is not None:
                p = p and gprob[i, gidx[groups[j]]] > gthr[gidx[groups[j]]]
            t = bool(vis[i, j])
            for acc in (pooled, per_point[j], per_group[groups[j]], img):
                if p and t:
                    acc["tp"] += 1
                    d = math.hypot(pxy[i, j, 0] - txy[i, j, 0], pxy[i, j, 1] - txy[i, j, 1])
                    acc["d"].append(d)
                    if spacing is not None and spacing[i] > 0:
                        acc["mm"].append(d * spacing[i])
                elif p:
                    acc["fp"] += 1
                elif t:
                    acc["fn"] += 1
        per_image.append(img)

    def summary(a):
        tp, fp, fn = a["tp"], a["fp"], a["fn"]
        return {
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "mean_error_px": sum(a["d"]) / len(a["d"]) if a["d"] else None,
            "loc_accuracy_20px": sum(d <= dist_px for d in a["d"]) / len(a["d"])
            if a["d"]
            else None,
            "mean_error_mm": sum(a["mm"]) / len(a["mm"]) if a["mm"] else None,
        }

    imgs = [summary(a) for a in per_image]
    per_image_mean = {}
    for m in imgs[0]:
        vals = [s[m] for s in imgs if s[m] is not None]
        per_image_mean[m] = sum(vals) / len(vals) if vals else None
    return {
        **summary(pooled),
        "per_image_mean": per_image_mean,
        "per_point": {schema.point_names[j]: summary(per_point[j]) for j in range(k)},
        "per_group": {g: summary(a) for g, a in per_group.items()},
    }


def _assert_close(got, want):
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def _random_case(seed, n=23, schema=SCHEMA):
    rng = np.random.default_rng(seed)
    k, g = schema.num_points, schema.num_groups
    prob = rng.uniform(size=(n, k))
    vis = rng.uniform(size=(n, k)) < 0.6
    txy = rng.uniform(0, 512, size=(n, k, 2))
    pxy = txy + rng.normal(0, 20, size=(n, k, 2))
    gprob = rng.uniform(size=(n, g))
    spacing = np.where(rng.uniform(size=n) < 0.7, rng.uniform(0.1, 0.4, size=n), 0.0)
    return prob, pxy, vis, txy, gprob, spacing


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_python_loop_on_random_inputs(seed, gated):
    prob, pxy, vis, txy, gprob, spacing = _random_case(seed)
    rng = np.random.default_rng(100 + seed)
    thr = rng.uniform(0.3, 0.7, size=SCHEMA.num_points)
    gthr = rng.uniform(0.2, 0.6, size=SCHEMA.num_groups)
    got = evaluate.keypoint_metrics(
        prob,
        pxy,
        vis,
        txy,
        SCHEMA,
        threshold=thr,
        group_prob=gprob if gated else None,
        group_threshold=gthr,
        pixel_spacing_mm=spacing,
    )
    want = _loop_reference(
        prob, pxy, vis, txy, SCHEMA, thr, gprob if gated else None, gthr, 20.0, spacing
    )
    keys = (*evaluate.METRIC_KEYS, "mean_error_mm")
    for m in keys:
        _assert_close(got[m], want[m])
        _assert_close(got["per_image_mean"][m], want["per_image_mean"][m])
    for name in SCHEMA.point_names:
        for m in keys:
            _assert_close(got["per_point"][name][m], want["per_point"][name][m])
    for name in SCHEMA.group_names:
        for m in keys:
            _assert_close(got["per_group"][name][m], want["per_group"][name][m])
    assert got["n_images"] == len(prob)
    json.dumps(got, allow_nan=False)  # every value is a plain float/int/None


def test_hand_computed_pooled_and_per_image():
    # Schema TINY: points P, Q (group a), R (group b). Two images, threshold 0.5.
    prob = np.array(
        [
            [0.9, 0.2, 0.6],  # predicted: P, R
            [0.1, 0.8, 0.7],
        ]
    )  # predicted: Q, R
    vis = np.array(
        [
            [1, 1, 0],  # true: P, Q
            [0, 1, 0],
        ],
        bool,
    )  # true: Q
    txy = np.zeros((2, 3, 2))
    pxy = np.zeros((2, 3, 2))
    pxy[0, 0] = (3.0, 4.0)  # image 0, P: TP at distance 5
    pxy[1, 1] = (30.0, 40.0)  # image 1, Q: TP at distance 50
    m = evaluate.keypoint_metrics(prob, pxy, vis, txy, TINY, pixel_spacing_mm=np.array([0.5, 0]))
    # Image 0: TP=1 (P), FN=1 (Q), FP=1 (R). Image 1: TP=1 (Q), FP=1 (R).
    # Pooled: TP=2, FP=2, FN=1 -> P = 2/4, R = 2/3, F1 = 4/(4+2+1) = 4/7.
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["mean_error_px"] == pytest.approx((5 + 50) / 2)
    assert m["loc_accuracy_20px"] == pytest.approx(0.5)
    assert m["mean_error_mm"] == pytest.approx(5 * 0.5)  # image 1 has no spacing
    # Per image: P = (1/2 + 1/2)/2, R = (1/2 + 1/1)/2, F1 = (2/4 + 2/3)/2,
    # error = (5 + 50)/2, accuracy = (1 + 0)/2.
    pim = m["per_image_mean"]
    assert pim["precision"] == pytest.approx(0.5)
    assert pim["recall"] == pytest.approx(0.75)
    assert pim["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert pim["mean_error_px"] == pytest.approx(27.5)
    assert pim["loc_accuracy_20px"] == pytest.approx(0.5)
    # Per point: P: TP 1 -> P=R=F1=1; Q: TP 1, FN 1 -> R 1/2; R: FP 2 -> precision 0, no recall.
    assert m["per_point"]["P"]["f1"] == 1.0
    assert m["per_point"]["Q"]["recall"] == pytest.approx(0.5)
    assert m["per_point"]["Q"]["precision"] == 1.0
    assert m["per_point"]["R"]["precision"] == 0.0
    assert m["per_point"]["R"]["recall"] is None
    assert m["per_point"]["R"]["mean_error_px"] is None
    # Group a = P + Q: TP 2, FN 1 -> F1 = 4/5.
    assert m["per_group"]["a"]["f1"] == pytest.approx(0.8)
    assert m["counts"] == {"tp": 2, "fp": 2, "fn": 1, "n_within": 1}


def test_per_image_mean_leaves_out_undefined_images():
    # Image 0 predicts nothing and shows nothing: no precision, recall or F1 -> left out.
    # Image 1 predicts nothing but shows P: recall 0, F1 0, precision undefined.
    # Image 2 predicts P and Q, shows P: precision 1/2, recall 1, F1 2/3.
    prob = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.9, 0.9, 0.1]])
    vis = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0]], bool)
    xy = np.zeros((3, 3, 2))
    m = evaluate.keypoint_metrics(prob, xy, vis, xy, TINY)
    pim, n = m["per_image_mean"], m["per_image_defined"]
    assert pim["precision"] == pytest.approx(0.5) and n["precision"] == 1
    assert pim["recall"] == pytest.approx(0.5) and n["recall"] == 2
    assert pim["f1"] == pytest.approx(1 / 3) and n["f1"] == 2
    assert pim["mean_error_px"] == 0.0 and n["mean_error_px"] == 1
    assert m["mean_error_mm"] is None and pim["mean_error_mm"] is None


def test_nothing_predicted_gives_none_not_nan():
    prob = np.zeros((2, 3))
    vis = np.ones((2, 3), bool)
    xy = np.zeros((2, 3, 2))
    m = evaluate.keypoint_metrics(prob, xy, vis, xy, TINY)
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["mean_error_px"] is None and m["loc_accuracy_20px"] is None
    json.dumps(m, allow_nan=False)


def test_per_point_threshold_and_strict_comparison():
    prob = np.array([[0.5, 0.6, 0.3]])
    vis = np.array([[1, 1, 1]], bool)
    xy = np.zeros((1, 3, 2))
    # p > t strictly: P at exactly 0.5 is not reported under 0.5.
    assert evaluate.keypoint_metrics(prob, xy, vis, xy, TINY)["recall"] == pytest.approx(1 / 3)
    m = evaluate.keypoint_metrics(prob, xy, vis, xy, TINY, threshold=[0.4, 0.7, 0.2])
    assert [m["per_point"][p]["recall"] for p in "PQR"] == [1.0, 0.0, 1.0]
    assert m["threshold"] == {"P": 0.4, "Q": 0.7, "R": 0.2}
    with pytest.raises(ValueError, match="shape"):
        evaluate.keypoint_metrics(prob, xy, vis, xy, TINY, threshold=[0.5, 0.5])


def test_group_gating_suppresses_points_of_absent_groups():
    prob = np.array([[0.9, 0.9, 0.9]])
    vis = np.array([[1, 0, 1]], bool)
    xy = np.zeros((1, 3, 2))
    # Group a below its threshold: P (TP) and Q (FP) are suppressed; R stays.
    m = evaluate.keypoint_metrics(prob, xy, vis, xy, TINY, group_prob=np.array([[0.3, 0.8]]))
    assert m["counts"] == {"tp": 1, "fp": 0, "fn": 1, "n_within": 1}
    assert m["per_point"]["P"]["recall"] == 0.0 and m["per_point"]["R"]["recall"] == 1.0
    m = evaluate.keypoint_metrics(
        prob, xy, vis, xy, TINY, group_prob=np.array([[0.3, 0.8]]), group_threshold=[0.2, 0.9]
    )
    assert m["counts"] == {"tp": 1, "fp": 1, "fn": 1, "n_within": 1}
    assert m["group_threshold"] == {"a": 0.2, "b": 0.9}


def test_localisation_radius_counts_the_boundary():
    prob = np.ones((1, 3))
    vis = np.ones((1, 3), bool)
    txy = np.zeros((1, 3, 2))
    pxy = np.array([[[20.0, 0.0], [12.0, 16.0], [20.0, 0.1]]])  # 20, 20, just over 20
    m = evaluate.keypoint_metrics(prob, pxy, vis, txy, TINY)
    assert m["loc_accuracy_20px"] == pytest.approx(2 / 3)
    assert (
        evaluate.keypoint_metrics(prob, pxy, vis, txy, TINY, dist_px=25)["loc_accuracy_20px"] == 1.0
    )


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="pred_prob"):
        evaluate.keypoint_metrics(
            np.zeros((2, 4)), np.zeros((2, 4, 2)), np.zeros((2, 4)), np.zeros((2, 4, 2)), TINY
        )
    with pytest.raises(ValueError, match="true_xy"):
        evaluate.keypoint_metrics(
            np.zeros((2, 3)), np.zeros((2, 3, 2)), np.zeros((2, 3)), np.zeros((2, 3, 3)), TINY
        )


def _loop_best(prob_col, vis_col, cands):
    best_t, best_f1 = None, -1.0
    for t in cands:
        tp = sum(p > t and v for p, v in zip(prob_col, vis_col, strict=True))
        fp = sum(p > t and not v for p, v in zip(prob_col, vis_col, strict=True))
        fn = sum(p <= t and v for p, v in zip(prob_col, vis_col, strict=True))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        if f1 > best_f1 + 1e-12 or (
            abs(f1 - best_f1) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)
        ):
            best_t, best_f1 = t, f1
    return best_t, best_f1


@pytest.mark.parametrize("seed", [0, 1])
def test_tune_thresholds_matches_loop_and_beats_default(seed):
    prob, _, vis, _, _, _ = _random_case(seed, n=60)
    prob = np.clip(prob * 0.5 + 0.45 * vis, 0, 1)  # informative but shifted probabilities
    cands = np.round(np.arange(0.05, 0.951, 0.05), 4)
    tuned = evaluate.tune_thresholds(prob, vis, SCHEMA, cands)
    assert tuned["groups"] is None
    for j, name in enumerate(SCHEMA.point_names):
        t, f1 = _loop_best(prob[:, j], vis[:, j], cands)
        assert tuned["points"][name] == pytest.approx(t)
        assert tuned["val_f1"]["points"][name] == pytest.approx(f1)
    thr = [tuned["points"][p] for p in SCHEMA.point_names]
    xy = np.zeros(prob.shape + (2,))
    tuned_f1 = evaluate.keypoint_metrics(prob, xy, vis, xy, SCHEMA, threshold=thr)["f1"]
    default_f1 = evaluate.keypoint_metrics(prob, xy, vis, xy, SCHEMA)["f1"]
    assert tuned_f1 >= default_f1


def test_tune_thresholds_unseen_point_and_useless_gating(tmp_path):
    prob = np.array([[0.9, 0.2, 0.3], [0.35, 0.8, 0.6], [0.1, 0.1, 0.2]])
    vis = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
    gprob = np.array([[0.8, 0.1], [0.9, 0.7], [0.2, 0.9]])
    cands = [0.1, 0.3, 0.5, 0.7]
    tuned = evaluate.tune_thresholds(prob, vis, TINY, cands, group_prob=gprob)
    # Ungated: P (0.9, 0.35 | 0.1) is perfect at 0.1 and 0.3 -> 0.3 (closer to 0.5);
    # Q (0.8 | 0.2, 0.1) perfect at 0.3, 0.5 -> 0.5; R is never visible: only 0.7 predicts
    # nothing (F1 taken as 1), lower candidates give a FP (F1 0) -> 0.7.
    # Ungated pooled F1 is already 1, so gating cannot beat it and is dropped.
    assert tuned["points"] == {"P": 0.3, "Q": 0.5, "R": 0.7}
    assert tuned["groups"] is None
    path = evaluate.save_thresholds(tmp_path, tuned)
    assert json.loads(path.read_text()) == tuned
    points, groups = evaluate.load_thresholds(tmp_path, TINY)
    np.testing.assert_allclose(points, [0.3, 0.5, 0.7])
    assert groups is None
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]  # no temp file left


def test_tune_thresholds_keeps_gating_when_it_helps(tmp_path):
    # Point probabilities cannot tell the images apart; the group probabilities can.
    prob = np.array([[0.6, 0.2, 0.9], [0.6, 0.2, 0.9], [0.6, 0.2, 0.4], [0.6, 0.2, 0.35]])
    vis = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], bool)
    gprob = np.array([[0.9, 0.1], [0.9, 0.2], [0.1, 0.9], [0.2, 0.8]])
    tuned = evaluate.tune_thresholds(prob, vis, TINY, [0.1, 0.3, 0.5, 0.7], group_prob=gprob)
    # Groups: a present in images 0, 1 (gp 0.9, 0.9 vs 0.1, 0.2): perfect at 0.3, 0.5 -> 0.5;
    # b present in 2, 3 (0.9, 0.8 vs 0.1, 0.2): perfect at 0.3, 0.5, 0.7 -> 0.5.
    assert tuned["groups"] == {"a": 0.5, "b": 0.5}
    assert tuned["val_f1"]["groups"] == {"a": 1.0, "b": 1.0}
    # Gated, R only in images 2, 3 (0.4, 0.35, both visible): perfect at 0.1, 0.3 -> 0.3.
    assert tuned["points"] == {"P": 0.5, "Q": 0.5, "R": 0.3}
    evaluate.save_thresholds(tmp_path, tuned)
    points, groups = evaluate.load_thresholds(tmp_path, TINY)
    m = evaluate.keypoint_metrics(
        prob,
        np.zeros((4, 3, 2)),
        vis,
        np.zeros((4, 3, 2)),
        TINY,
        threshold=points,
        group_prob=gprob,
        group_threshold=groups,
    )
    assert m["f1"] == 1.0


def test_load_thresholds_defaults_and_errors(tmp_path):
    points, groups = evaluate.load_thresholds(tmp_path, TINY)
    np.testing.assert_array_equal(points, [0.5, 0.5, 0.5])
    assert groups is None
    (tmp_path / "thresholds.json").write_text('{"points": {"P": 0.5}}')
    with pytest.raises(ValueError, match="thresholds.json"):
        evaluate.load_thresholds(tmp_path, TINY)


# ----------------------------------------------------------------------------------------------
# evaluate_project: a tiny checkpoint on a tiny project with frames of two sizes


def _write_tiny_project(root, sizes=((64, 64), (48, 64)), cases=5):
    from tavr_jax.data.supervisely import AnnotatedFrame, write_project

    rng = np.random.default_rng(0)
    frames = []
    for c in range(cases):
        h, w = sizes[c % len(sizes)]  # two frame sizes: coords must scale per frame
        for f in range(2):
            vis = rng.uniform(size=SCHEMA.num_points) < 0.6
            xy = np.where(vis[:, None], rng.uniform(2, [w - 2, h - 2], (SCHEMA.num_points, 2)), 0)
            frames.append(
                AnnotatedFrame(
                    case_id=f"case{c}",
                    frame_name=f"{f:04d}.png",
                    image=rng.integers(0, 256, (h, w), dtype=np.uint8),
                    visibility=vis,
                    coords=xy.astype(np.float32),
                    pixel_spacing_mm=0.3 if c < 3 else None,
                )
            )
    return write_project(root, SCHEMA, frames)


def _write_tiny_checkpoint(workdir, config: dict):
    """config.json + a best checkpoint of random weights, as a training run leaves them."""
    import jax
    import jax.numpy as jnp

    from tavr_jax.checkpoint import CheckpointStore
    from tavr_jax.models import create_model

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config))
    model = create_model(SCHEMA, backbone=config["backbone"], head=config["head"],
                         grouped=config["grouped"])  # fmt: skip
    # Random variables of the real shapes, filled on the host: eval_shape only traces (the
    # jitted model.init takes tens of seconds on a loaded 2-core CPU).
    size = config["image_size"]
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, size, size), jnp.uint8))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return np.ones(leaf.shape, np.float32)
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) == 4 else leaf.shape[-2]
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    with CheckpointStore(workdir, async_save=False) as store:
        store.save_best(1, dict(variables), 0.5)
    return model, variables


TINY_CONFIG = dict(
    schema="paper11", backbone="resnet_tiny", head="regression", grouped=True,
    image_size=32, dtype="float32", data_seed=0, val_fraction=0.4, test_fraction=0.0,
)  # fmt: skip


def _tiny_workdir_and_project(tmp_path):
    data = _write_tiny_project(tmp_path / "data")
    model, variables = _write_tiny_checkpoint(tmp_path / "w", TINY_CONFIG)
    return tmp_path / "w", data, model, variables, TINY_CONFIG


def _direct_prediction(model, variables, images, size):
    """Resize + network by hand, coordinates scaled to each frame: the engine's contract."""
    import jax
    import jax.numpy as jnp

    x = jnp.stack(
        [jax.image.resize(jnp.asarray(im, jnp.float32), (size, size), "linear") for im in images]
    )
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    wh = np.array([[im.shape[1], im.shape[0]] for im in images], np.float64)
    return np.asarray(jax.nn.sigmoid(out["visibility_logits"])), np.asarray(out["coords"]) * wh[
        :, None
    ]


def test_evaluate_project_matches_direct_forward(tmp_path):
    from tavr_jax.data.supervisely import read_project, split_cases

    workdir, data, model, variables, config = _tiny_workdir_and_project(tmp_path)
    val_cases = split_cases([f"case{c}" for c in range(5)], seed=0, val_fraction=0.4,
                            test_fraction=0.0)["val"]  # fmt: skip
    overlays = tmp_path / "overlays"
    m = evaluate.evaluate_project(
        workdir, data, split="val", batch_size=3, overlays_dir=overlays, threshold=0.5
    )
    project = read_project(data, SCHEMA, split="val", seed=0, val_fraction=0.4)
    assert sorted(project.cases) == sorted(val_cases) and m["n_cases"] == len(val_cases)
    assert m["n_images"] == 2 * len(val_cases) and m["split"] == "val"
    images = [project.load_image(i) for i in range(len(project))]
    prob, xy = _direct_prediction(model, variables, images, 32)
    vis = np.stack([f.visibility for f in project.frames])
    txy = np.stack([f.coords for f in project.frames])
    spacing = np.array([f.pixel_spacing_mm or 0 for f in project.frames])
    want = evaluate.keypoint_metrics(prob, xy, vis, txy, SCHEMA, pixel_spacing_mm=spacing)
    for key in (*evaluate.METRIC_KEYS, "mean_error_mm"):
        _assert_close_tol(m[key], want[key])
        _assert_close_tol(m["per_image_mean"][key], want["per_image_mean"][key])
    assert m["counts"] == want["counts"]
    assert m["counts"]["tp"] > 0 and m["mean_error_mm"] is not None  # the distances were compared
    pngs = sorted(overlays.glob("*.png"))
    assert len(pngs) == m["n_images"]
    import cv2

    first = project.frames[0]
    assert cv2.imread(str(pngs[0])).shape == (first.height, first.width, 3)

    # Tuned thresholds are written to the workdir and then used by default.
    tuned = evaluate.tune_project(workdir, data, batch_size=4)
    assert json.loads((workdir / "thresholds.json").read_text())["points"] == tuned["points"]
    m2 = evaluate.evaluate_project(workdir, data, split="val", batch_size=4)
    want = tuned["points"] if len(set(tuned["points"].values())) > 1 else tuned["points"]["AA1"]
    assert m2["threshold"] == want
    assert m["threshold"] == 0.5


def _assert_close_tol(got, want):
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_evaluate_project_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.evaluate_project(tmp_path, tmp_path, split="val")


# ----------------------------------------------------------------------------------------------
# Table 1


def _metrics(f1, precision=0.9, recall=0.8, err=12.5, acc=0.75, pim_f1=None, width=512.0):
    return {
        "precision": precision, "recall": recall, "f1": f1, "mean_error_px": err,
        "loc_accuracy_20px": acc, "per_image_mean": {"f1": f1 if pim_f1 is None else pim_f1},
        "frame_width_px": width, "train_seconds": 61.0,
    }  # fmt: skip


def test_table1_variants():
    V = evaluate.Variant
    assert evaluate.table1_variants(["resnet18", "resnet34"]) == [
        V("resnet18"), V("resnet34"), V("resnet34", head="integral"), V("resnet34", grouped=False)
    ]  # fmt: skip
    assert evaluate.table1_variants(["vgg16"], "resnet_tiny")[1:] == [
        V("resnet_tiny"), V("resnet_tiny", head="integral"), V("resnet_tiny", grouped=False)
    ]  # fmt: skip
    assert V("resnet34", grouped=False).name == "resnet34-regression-ungrouped"


def test_table1_markdown_rows_and_ablation():
    V = evaluate.Variant
    results = [
        (V("resnet34"), _metrics(0.9, err=12.5, width=512.0, pim_f1=0.88)),
        (V("resnet34", head="integral"), _metrics(0.95, err=None, acc=None)),
        (V("resnet34", grouped=False), _metrics(0.8)),
    ]
    text = evaluate.table1_markdown(
        results, ablation_backbone="resnet34", command="python x.py", budget="10 steps",
        device="cpu", date="2026-11-21",
    )  # fmt: skip
    lines = text.splitlines()
    # Ours then the paper's row (error @1024 = 12.5 * 1024 / 512 = 25.00; paper 25.65 * 2).
    ours = lines.index("| ResNet34 | regression | yes | ours | 0.9000 | 0.8000 | 0.9000 | 12.50 "
                       "| 0.7500 | 25.00 | 0.8800 | 61 |")  # fmt: skip
    assert lines[ours + 1] == (
        "| ResNet34 | regression | yes | paper | 0.9235 | 0.9602 | 0.9332 | 25.65 | 0.5505 "
        "| 51.30 | - | - |"
    )
    assert "| ResNet34 | integral | yes | ours | 0.9000 | 0.8000 | 0.9500 | - | - | - |" in text
    assert sum(" | paper | " in line for line in lines) == 1  # only the paper's own setup
    # Ablation: 0.9 - 0.8 = +0.1000 F1 points, 0.1 / 0.8 = +12.5% relative: both hold.
    assert "F1 difference (grouped - not grouped): +0.1000 (+12.5% relative)" in text
    assert "0.08 F1 points, holds; read as 8% relative, holds" in text
    assert "Command: `python x.py`" in text and "2026-11-21" in text
    partial = evaluate.table1_markdown(
        results[:1], ablation_backbone="resnet34", command="", budget="", device="", date=""
    )
    assert "Not available" in partial


def test_run_table1_trains_each_variant_and_writes_table(tmp_path):
    import ml_collections

    data = _write_tiny_project(tmp_path / "data", sizes=((32, 32),))
    seen = []

    def fake_train(config, workdir, data_dir):
        assert data_dir == data
        seen.append((config.backbone, config.head, config.grouped, config.num_steps,
                     config.image_size, config.test_fraction))  # fmt: skip
        _write_tiny_checkpoint(workdir, config.to_dict())

    base = ml_collections.ConfigDict(dict(TINY_CONFIG, batch_size=4, optimizer="adamw",
                                          learning_rate=1e-3, warmup_steps=30, num_steps=300,
                                          eval_every=100, checkpoint_every=100))  # fmt: skip
    out = tmp_path / "docs" / "table1.md"
    results = evaluate.run_table1(
        base, data, out, backbones=["resnet_tiny"], steps=4, image_size=32,
        workdir_root=tmp_path / "runs", ablation_backbone="resnet_tiny", train_fn=fake_train,
        eval_batch_size=2,
    )  # fmt: skip
    assert seen == [
        ("resnet_tiny", "regression", True, 4, 32, 0.2),
        ("resnet_tiny", "integral", True, 4, 32, 0.2),
        ("resnet_tiny", "regression", False, 4, 32, 0.2),
    ]
    assert base.num_steps == 300  # the caller's config is not modified
    for variant, m in results:
        saved = json.loads((tmp_path / "runs" / variant.name / "metrics_test.json").read_text())
        assert saved["split"] == "test" and saved["f1"] == m["f1"]
        assert (tmp_path / "runs" / variant.name / "thresholds.json").exists()
    text = out.read_text()
    assert text.count(" | ours | ") == 3 and "## Grouped vs not grouped" in text
    assert "test split 2 frames of 1 cases, 32 px wide" in text
    # A finished variant is reused (resume); another budget retrains.
    seen.clear()
    evaluate.run_table1(
        base, data, out, backbones=["resnet_tiny"], steps=4, image_size=32,
        workdir_root=tmp_path / "runs", ablation_backbone="resnet_tiny", train_fn=fake_train,
    )  # fmt: skip
    assert seen == [] and out.read_text() == text

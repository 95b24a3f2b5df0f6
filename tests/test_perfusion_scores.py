import numpy as np
import pytest

from perfusion import geometry, scores


def _tiny_segments():
    # 4x4 grid: segment 1 top-left 2x2, segment 2 top-right 2x2, segment 17 bottom-left,
    # bottom-right outside the LV.
    seg = np.zeros((4, 4), np.int32)
    seg[:2, :2] = 1
    seg[:2, 2:] = 2
    seg[2:, :2] = 17
    return seg


def test_fit_normal_limits_hand_values_and_sex_fallback():
    stress = np.stack([np.full((4, 4), v, np.float32) for v in (0.6, 0.8, 1.0)])
    rest = stress + 0.1
    nl = scores.fit_normal_limits(stress, rest, sex=["M", "M", "F"], min_group=2, sd_floor=0.0)
    np.testing.assert_allclose(nl.mean["all"][0], 0.8, atol=1e-6)
    np.testing.assert_allclose(nl.mean["all"][1], 0.9, atol=1e-6)
    np.testing.assert_allclose(nl.sd["all"][0], 0.2, atol=1e-6)  # sample SD of 0.6, 0.8, 1.0
    np.testing.assert_allclose(nl.mean["M"][0], 0.7, atol=1e-6)
    assert "F" not in nl.mean  # one female normal < min_group: pooled limits are used
    m, _ = nl.for_sex("female")
    np.testing.assert_allclose(m, nl.mean["all"])
    m, _ = nl.for_sex("M")
    np.testing.assert_allclose(m, nl.mean["M"])
    floored = scores.fit_normal_limits(stress, stress, sd_floor=0.5)
    np.testing.assert_allclose(floored.sd["all"], 0.5)


def test_normal_limits_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    nl = scores.fit_normal_limits(
        rng.random((12, 8, 8)), rng.random((12, 8, 8)), sex=["M"] * 10 + ["F"] * 2
    )
    nl.save(tmp_path / "nl.npz")
    back = scores.NormalLimits.load(tmp_path / "nl.npz")
    assert back.count == nl.count == {"all": 12, "M": 10}
    np.testing.assert_array_equal(back.sd["M"], nl.sd["M"])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        scores.NormalLimits.load(tmp_path / "missing.npz")


def test_score_studies_tiny_grid_by_hand():
    seg = _tiny_segments()
    mean = np.full((2, 4, 4), 0.8, np.float32)
    sd = np.full((2, 4, 4), 0.1, np.float32)
    stress = np.full((4, 4), 0.8, np.float32)
    stress[0, 0] = 0.0  # z = 8, severity 1
    stress[0, 1] = 0.4  # z = 4, severity 0.5
    stress[1, 0] = 0.6  # z = 2 < k: not blackout, still counts in the segment mean
    stress[3, 3] = 0.0  # outside the LV: ignored everywhere
    rest = np.full((4, 4), 0.8, np.float32)
    rest[0, 0] = 0.4  # z = 4 at rest
    cfg = scores.ScoreConfig(k=2.5, segment_z=(1.0, 2.0, 3.0, 4.0), territory_min_score=3)
    out = scores.score_studies(stress[None], rest[None], mean, sd, seg, cfg)
    n_lv = 12
    np.testing.assert_allclose(out["extent_pct"][0], [100 * 2 / n_lv, 100 * 1 / n_lv], rtol=1e-6)
    np.testing.assert_allclose(out["tpd"][0], [100 * 1.5 / n_lv, 100 * 0.5 / n_lv], rtol=1e-5)
    # Segment 1 stress: z = (8 + 4 + 2 + 0) / 4 = 3.5 -> score 3; rest: 4 / 4 = 1 -> score 1.
    np.testing.assert_allclose(out["segment_z"][0, :, 0], [3.5, 1.0], rtol=1e-6)
    assert out["scores"][0, 0, 0] == 3 and out["scores"][0, 1, 0] == 1
    assert out["scores"][0].sum() == 4  # no other segment is abnormal
    assert out["sss"][0] == 3 and out["srs"][0] == 1 and out["sds"][0] == 2
    assert out["reversibility"][0, 0] == scores.REVERSIBILITY.index("partially_reversible")
    # Segment 1 is LAD: territory score 3 >= 3.
    assert scores.territory_names(out["territories"][0]) == ["LAD"]
    assert out["blackout"][0, 0, 3, 3] == 0


def _loop_reference(stress, rest, mean, sd, seg, cfg):
    """Straightforward per-study, per-pixel loops."""
    res = []
    lv = [(i, j) for i in range(seg.shape[0]) for j in range(seg.shape[1]) if seg[i, j] > 0]
    for b in range(stress.shape[0]):
        study = {"extent": [], "tpd": [], "scores": []}
        for p, u in enumerate((stress[b], rest[b])):
            m, s = mean[b, p], sd[b, p]
            nblack, sev = 0, 0.0
            zsum = [0.0] * 17
            zcnt = [0] * 17
            for i, j in lv:
                z = (m[i, j] - u[i, j]) / s[i, j]
                zsum[seg[i, j] - 1] += z
                zcnt[seg[i, j] - 1] += 1
                if z > cfg.k:
                    nblack += 1
                    sev += min(max((m[i, j] - u[i, j]) / m[i, j], 0.0), 1.0)
            study["extent"].append(100 * nblack / len(lv))
            study["tpd"].append(100 * sev / len(lv))
            sc = []
            for q in range(17):
                zq = zsum[q] / zcnt[q] if zcnt[q] else 0.0
                sc.append(sum(zq >= t for t in cfg.segment_z))
            study["scores"].append(sc)
        s_sc, r_sc = study["scores"]
        study["sds"] = sum(max(a - c, 0) for a, c in zip(s_sc, r_sc, strict=True))
        terr = []
        for name in scores.TERRITORY_NAMES:
            tot = sum(s_sc[q - 1] for q in geometry.TERRITORIES[name])
            terr.append(tot >= cfg.territory_min_score)
        study["territories"] = terr
        res.append(study)
    return res


def test_score_studies_matches_numpy_loop_on_polar_grid():
    size = 24
    seg = geometry.segment_map(size)
    rng = np.random.default_rng(1)
    b = 3
    mean = rng.uniform(0.6, 0.9, (b, 2, size, size)).astype(np.float32)
    sd = rng.uniform(0.03, 0.08, (b, 2, size, size)).astype(np.float32)
    stress = (mean[:, 0] - rng.normal(1.5, 2.0, (b, size, size)) * sd[:, 0]).astype(np.float32)
    rest = (mean[:, 1] - rng.normal(0.5, 2.0, (b, size, size)) * sd[:, 1]).astype(np.float32)
    cfg = scores.ScoreConfig(k=2.0, segment_z=(0.5, 1.0, 1.5, 2.5), territory_min_score=4)
    out = scores.score_studies(stress, rest, mean, sd, seg, cfg)
    ref = _loop_reference(stress, rest, mean, sd, seg, cfg)
    for i, r in enumerate(ref):
        np.testing.assert_allclose(out["extent_pct"][i], r["extent"], rtol=1e-5)
        np.testing.assert_allclose(out["tpd"][i], r["tpd"], rtol=1e-4)
        np.testing.assert_array_equal(out["scores"][i], r["scores"])
        assert out["sds"][i] == r["sds"]
        np.testing.assert_array_equal(out["territories"][i], r["territories"])
    assert out["scores"].max() > 0  # the test exercises non-trivial scores


def test_score_studies_rejects_mismatched_sizes():
    seg = geometry.segment_map(16)
    with pytest.raises(ValueError, match="differ"):
        scores.score_studies(
            np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), np.ones((2, 8, 8)), np.ones((2, 8, 8)), seg
        )


def test_segment_f1_and_tune_config_by_hand():
    true = np.zeros((2, 17), bool)
    true[0, [0, 1]] = True
    pred = np.zeros((2, 17), bool)
    pred[0, 0] = pred[1, 5] = True
    f = scores.segment_f1(pred, true)
    assert (f["tp"], f["fp"], f["fn"]) == (1, 1, 1)
    assert f["f1"] == pytest.approx(0.5)
    # Defect segments have z 3, others 0.5: any t1 in (0.5, 3] separates them perfectly.
    seg_z = np.where(true, 3.0, 0.5).astype(np.float32)
    terr = np.array([[True, False, False], [False, False, False]])
    cfg, info = scores.tune_config(seg_z, true, terr)
    assert 0.5 < cfg.segment_z[0] <= 3.0
    assert info["segment_f1"] == 1.0 and info["territory_exact"] == 1.0
    assert list(cfg.segment_z) == sorted(cfg.segment_z)
    # labels.csv without segments or territories: nothing to tune, the base config stays.
    base = scores.ScoreConfig(k=3.0, segment_z=(1.0, 2.0, 3.0, 4.0), territory_min_score=5)
    cfg, info = scores.tune_config(seg_z, np.zeros_like(true), np.zeros_like(terr), base=base)
    assert cfg == base and info == {}


def test_reversibility_categories():
    s = np.array([0, 2, 2, 2, 1])
    r = np.array([0, 0, 1, 2, 3])
    got = [scores.REVERSIBILITY[i] for i in scores.reversibility(s, r)]
    assert got == ["normal", "reversible", "partially_reversible", "fixed", "fixed"]


def test_polar_and_segment_features_against_a_loop():
    rng = np.random.default_rng(7)
    size, b = 24, 3
    seg = geometry.segment_map(size)
    lv = seg > 0
    stress, rest = rng.uniform(0.3, 1.0, (2, b, size, size))
    mean = rng.uniform(0.7, 0.9, (b, 2, size, size))
    sd = rng.uniform(0.03, 0.08, (b, 2, size, size))
    polar = scores.polar_features(stress, rest, mean, sd, seg)
    per = scores.segment_features(stress, rest, mean, sd, seg)
    names = scores.POLAR_FEATURE_NAMES
    assert polar.shape == (b, len(names)) and per.shape == (
        b,
        17,
        len(scores.SEGMENT_FEATURE_NAMES),
    )
    pn = {n: i for i, n in enumerate(scores.SEGMENT_FEATURE_NAMES)}
    for i in range(b):
        zseg = {}
        for p, u in enumerate((stress[i], rest[i])):
            z = (mean[i, p] - u) / sd[i, p]
            deficit = (mean[i, p] - u) / mean[i, p]
            phase = ("stress", "rest")[p]
            for s in range(1, 18):
                px = seg == s
                zseg[phase, s] = z[px].mean()
                assert polar[i, names.index(f"z_{phase}_{s}")] == pytest.approx(
                    z[px].mean(), rel=1e-4
                )
                assert polar[i, names.index(f"extent_{phase}_{s}")] == pytest.approx(
                    np.mean(z[px] > 2)
                )
                assert polar[i, names.index(f"deficit_{phase}_{s}")] == pytest.approx(
                    deficit[px].mean(), rel=1e-4
                )
            tpd = 100 * np.sum(np.clip(deficit, 0, 1)[lv & (z > 2)]) / lv.sum()
            assert polar[i, names.index(f"tpd_{phase}")] == pytest.approx(tpd, rel=1e-4)
            assert polar[i, names.index(f"extent_{phase}")] == pytest.approx(
                100 * np.mean(z[lv] > 2), rel=1e-4
            )
            pos = [max(zseg[phase, s], 0) for s in range(1, 18)]
            assert polar[i, names.index(f"z_sum_{phase}")] == pytest.approx(sum(pos), rel=1e-4)
            for t, members in geometry.TERRITORIES.items():
                want = sum(max(zseg[phase, s], 0) for s in members)
                assert polar[i, names.index(f"territory_z_{phase}_{t}")] == pytest.approx(
                    want, rel=1e-4
                )
        change = [zseg["stress", s] - zseg["rest", s] for s in range(1, 18)]
        assert polar[i, names.index("z_change_5")] == pytest.approx(change[4], rel=1e-4)
        assert polar[i, names.index("z_sum_change")] == pytest.approx(
            sum(max(c, 0) for c in change), rel=1e-4
        )
        for s in range(1, 18):
            row = per[i, s - 1]
            z = (mean[i, 0] - stress[i]) / sd[i, 0]
            assert row[pn["z_stress"]] == pytest.approx(zseg["stress", s], rel=1e-4)
            assert row[pn["extent_stress_2.5"]] == pytest.approx(np.mean(z[seg == s] > 2.5))
            own = geometry.SEGMENT_TERRITORY[s]
            want = sum(max(zseg["stress", q], 0) for q in geometry.TERRITORIES[own])
            assert row[pn["territory_z_stress"]] == pytest.approx(want, rel=1e-4)
            onehot = row[pn["is_segment_1"] :]
            assert onehot[s - 1] == 1 and onehot.sum() == 1


def test_defect_persistence_against_a_pixel_loop_and_its_meaning():
    rng = np.random.default_rng(3)
    size = 24
    seg = geometry.segment_map(size)
    lv_pixels = [(y, x) for y in range(size) for x in range(size) if seg[y, x] > 0]
    mean = rng.uniform(0.7, 0.9, (2, 2, size, size))
    sd = rng.uniform(0.03, 0.08, (2, 2, size, size))
    stress = rng.uniform(0.3, 1.0, (2, size, size))
    rest = rng.uniform(0.3, 1.0, (2, size, size))
    got = scores.defect_persistence(stress, rest, mean, sd, seg)
    names = scores.POLAR_FEATURE_NAMES
    polar = scores.polar_features(stress, rest, mean, sd, seg)
    persistence = slice(names.index("persistence_deficit"), names.index("reversal_core"))
    np.testing.assert_array_equal(polar[:, persistence], got)
    for i in range(2):
        for j, scale in enumerate((np.ones_like(sd[i]), sd[i])):
            s = [max(mean[i, 0, y, x] - stress[i, y, x], 0) / scale[0, y, x] for y, x in lv_pixels]
            r = [max(mean[i, 1, y, x] - rest[i, y, x], 0) / scale[1, y, x] for y, x in lv_pixels]
            whole = sum(a * b for a, b in zip(s, r, strict=True)) / (sum(a * a for a in s) + 1e-6)
            cut = np.quantile(s, scores.PERSISTENCE_CORE)
            core = [k for k, a in enumerate(s) if a >= cut]
            in_core = sum(r[k] for k in core) / (sum(s[k] for k in core) + 1e-6)
            assert got[i, 2 * j] == pytest.approx(whole, rel=1e-4)
            assert got[i, 2 * j + 1] == pytest.approx(in_core, rel=1e-4)
    # One stress defect: still there at rest (infarction) -> 1; gone at rest (ischemia) -> 0.
    normal = np.full((size, size), 0.8)
    defect = np.where(seg == 5, 0.4, 0.8)
    limits_mean, limits_sd = np.full((2, size, size), 0.8), np.full((2, size, size), 0.05)
    fixed = scores.defect_persistence(defect[None], defect[None], limits_mean, limits_sd, seg)
    reversible = scores.defect_persistence(defect[None], normal[None], limits_mean, limits_sd, seg)
    np.testing.assert_allclose(fixed, 1.0, atol=1e-4)
    np.testing.assert_allclose(reversible, 0.0, atol=1e-6)


def _reversal_by_loops(stress, rest, mean, sd, seg):
    """defect_reversal written plainly: per study, lstsq on the healthy pixels and cv2's blur."""
    import cv2

    lv = seg > 0
    size = seg.shape[0]
    radius, angle = geometry.polar_coords(size)
    sigma = scores.REVERSAL_SMOOTH * size
    out = []
    for i in range(len(stress)):
        s, r, m, d = stress[i], rest[i], mean[i], sd[i]
        healthy = lv & ((m[0] - s) / d[0] < scores.REVERSAL_HEALTHY_Z)
        basis = [np.ones_like(s), radius * np.cos(np.radians(angle)),
                 radius * np.sin(np.radians(angle))]  # fmt: skip
        a = np.stack([b[healthy] for b in basis], 1)
        coef = np.linalg.lstsq(a, (r - s)[healthy], rcond=None)[0]
        reversal = r - s - sum(c * b for c, b in zip(coef, basis, strict=True))
        s_def = np.where(lv, np.maximum(m[0] - s, 0.0), 0.0)
        r_def = np.where(lv, np.maximum(s_def - reversal, 0.0), 0.0)
        k = 2 * int(np.ceil(5 * sigma)) + 1
        blur = [cv2.GaussianBlur(x, (k, k), sigma, borderType=cv2.BORDER_CONSTANT)[lv]
                for x in (s_def, r_def)]  # fmt: skip
        sv, rv = blur
        core = sv >= 0.8 * sv.max()
        rim = (sv >= 0.3 * sv.max()) & (sv < 0.6 * sv.max())
        c_ratio, r_ratio = rv[core].sum() / sv[core].sum(), rv[rim].sum() / sv[rim].sum()
        area = (rv >= 0.5 * rv.max()).sum() / ((sv >= 0.5 * sv.max()).sum() + 1)
        corr = np.corrcoef(sv, rv)[0, 1]
        out.append([c_ratio, r_ratio, c_ratio - r_ratio, area, corr, rv.max() / sv.max()])
    return np.array(out)


def _one_defect(size, widen=1.0):
    """(S, S) a smooth defect of depth 1 in the lateral wall (wider with widen > 1)."""
    radius, angle = geometry.polar_coords(size)
    da = (angle - 10.0 + 180.0) % 360.0 - 180.0
    return np.exp(-((da / (25.0 * widen)) ** 2) - ((radius - 0.7) / (0.15 * widen)) ** 2)


def test_defect_reversal_against_a_plain_implementation_and_its_meaning():
    size = 64
    seg = geometry.segment_map(size)
    rng = np.random.default_rng(0)
    mean = np.full((2, size, size), 0.8) + rng.normal(0.0, 0.01, (2, size, size))
    sd = np.full((2, size, size), 0.05)
    normal = 0.8 + rng.normal(0.0, 0.01, (3, size, size))
    stress = normal - 0.3 * _one_defect(size)[None] * np.array([1.0, 1.0, 0.6])[:, None, None]
    rest = normal - 0.3 * _one_defect(size)[None] * np.array([0.2, 0.8, 0.1])[:, None, None]
    means, sds = np.broadcast_to(mean, (3, 2, size, size)), np.broadcast_to(sd, (3, 2, size, size))
    got = scores.defect_reversal(stress, rest, mean, sd, seg)
    np.testing.assert_allclose(got, _reversal_by_loops(stress, rest, means, sds, seg), atol=2e-3)
    names = scores.POLAR_FEATURE_NAMES
    polar = scores.polar_features(stress, rest, mean, sd, seg)
    np.testing.assert_array_equal(polar[:, names.index("reversal_core") :], got)

    # The defect scaled down at rest (ischemia, 20% of it left; infarction, 80%): the share is
    # the same at the core and at the rim, the shape the same. (The defect's faint tails count
    # as healthy pixels and lift the learnt offset a little: 0.25 is read for 0.2.)
    col = {n: i for i, n in enumerate(scores.REVERSAL_FEATURES)}
    for i, left in ((0, 0.2), (1, 0.8)):
        assert got[i, col["core"]] == pytest.approx(left, abs=0.06)
        assert got[i, col["rim"]] == pytest.approx(left, abs=0.1)
        assert got[i, col["peak"]] == pytest.approx(left, abs=0.06)
        assert abs(got[i, col["core_minus_rim"]]) < 0.05
        assert got[i, col["correlation"]] > 0.9
    # A fixed core (80% left) in a reversible rim twice as wide: the rim recovers, the core
    # does not, and the rest defect is smaller than the stress defect.
    mixed_stress = normal[0] - 0.3 * np.maximum(_one_defect(size), _one_defect(size, widen=2.0))
    mixed_rest = normal[0] - 0.3 * 0.8 * _one_defect(size)
    mixed = scores.defect_reversal(mixed_stress[None], mixed_rest[None], mean, sd, seg)[0]
    assert mixed[col["core"]] == pytest.approx(0.8, abs=0.06)
    assert mixed[col["core_minus_rim"]] > 0.25
    assert mixed[col["area"]] < 0.5 < got[0, col["area"]]
    # Rest acquired brighter and tilted against stress over the whole map: learnt on the
    # healthy pixels and taken out, so the features of the scaled defects hardly move.
    radius, angle = geometry.polar_coords(size)
    tilted = 1.05 * rest + 0.02 + 0.03 * radius * np.cos(np.radians(angle + 40.0))
    moved = scores.defect_reversal(stress, tilted, mean, sd, seg)
    for k in ("core", "rim", "peak"):
        np.testing.assert_allclose(moved[:2, col[k]], got[:2, col[k]], atol=0.05)

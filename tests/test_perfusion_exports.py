"""Workstation screenshots: drawn by perfusion.exports, read back by perfusion.studies.

The uptake read from a screenshot is compared with the simulated truth: mean absolute error
inside r < 0.95 of the 64 px grid, the same measure as tests/test_perfusion_studies.py.
"""

import cv2
import numpy as np
import pytest

from perfusion import exports, geometry, overlays, panels, simulate, studies

SIZE = 64
INNER = geometry.polar_coords(SIZE)[0] < 0.95
WHITE, BLACK, GREY, CYAN = (255, 255, 255), (0, 0, 0), (128, 128, 128), (0, 255, 255)
MAGENTA = (255, 0, 255)


def _screenshot(tmp_path, name, *, seed=0, **style):
    """(truth, path) of a screenshot of a clinical-difficulty ischemia study in `style`."""
    rng = np.random.default_rng(seed)
    sim = simulate.simulate_study(rng, SIZE, label="ischemia", difficulty="clinical")
    style = exports.random_style(rng, **style)
    image = exports.render_screenshot(sim.stress, sim.rest, style, rng)
    path = tmp_path / f"{name}.{style.file_format}"
    path.write_bytes(exports.encode(image, style))
    return sim, path


def _errors(study, sim):
    return [
        float(np.abs(read - truth)[INNER].mean())
        for read, truth in ((study.stress_uptake, sim.stress), (study.rest_uptake, sim.rest))
    ]


# Each case fixes what it is about; the rest of the style is drawn from the seed.
CASES = {
    "grid and scores, white over hot": dict(
        chrome=False, layout="side", colormap="hot", grid_colour=WHITE, score_colour=WHITE,
        third_map=None, file_format="png", disk_px=200,
    ),
    "stacked, black grid, JPEG 85": dict(
        layout="stacked", colormap="spectrum", grid_colour=BLACK, grid_thickness=2,
        third_map=None, file_format="jpg", jpeg_quality=85, disk_px=180,
    ),
    "third map in a row": dict(
        layout="side", third_map="reversibility", colormap="thermal", grid_colour=GREY,
        file_format="png", disk_px=170,
    ),
    "third map below, 2 x 2": dict(
        layout="grid", third_map="difference", colormap="jet", grid_colour=WHITE,
        file_format="jpg", jpeg_quality=90, disk_px=170,
    ),
    "window chrome, cursor, bar": dict(
        chrome=True, colorbar="right", cursor="arrow", colormap="turbo", grid_colour=CYAN,
        third_map=None, file_format="png", disk_px=200,
    ),
    "JPEG quality 60": dict(
        chrome=True, colormap="spectrum", grid_colour=WHITE, grid_thickness=1, third_map=None,
        file_format="jpg", jpeg_quality=60, disk_px=200,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_screenshots_read_back_within_tolerance(tmp_path, case):
    sim, path = _screenshot(tmp_path, "shot", seed=list(CASES).index(case), **CASES[case])
    study = studies.read_study_image(path, size=SIZE)
    # A clean export reads within 0.004-0.02; a drawn-over screenshot within 0.03. A third
    # map taken as rest would be off by 0.1 or more.
    assert max(_errors(study, sim)) < 0.03, case
    # the 17-segment grid and its scores cover part of the disk, never most of it
    assert 0.03 < study.masked_fraction < 0.5, (case, study.masked_fraction)


def test_a_clean_export_has_next_to_nothing_masked(tmp_path):
    sim = simulate.simulate_study(np.random.default_rng(1), SIZE, label="infarction")
    image = simulate.render_study_image(sim.stress, sim.rest, colormap="hot", disk_px=150)
    cv2.imwrite(str(tmp_path / "clean.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    study = studies.read_study_image(tmp_path / "clean.png", size=SIZE)
    # what is masked (1%): a defect's sharpest corners and clipped hot specks, filled
    assert study.masked_fraction < 0.03 and max(_errors(study, sim)) < 0.02


def _refused(path, message):
    with pytest.raises(ValueError, match=message) as info:
        studies.read_study_image(path, size=SIZE)
    assert path.name in str(info.value) and "\n" not in str(info.value)


# a 3 px cyan grid and bold scores on 140 px maps, JPEG at 60: its colour smeared to 7-9 px
# wide lines, 62-74% of a disk is hidden on such screenshots (seeds 0-7)
HEAVY = dict(
    chrome=False, layout="side", third_map=None, colormap="spectrum", grid_colour=CYAN,
    grid_thickness=3, score_colour=WHITE, font_thickness=2, font_scale=0.7, disk_px=140,
    file_format="jpg", jpeg_quality=60,
)  # fmt: skip


def test_refuses_a_screen_without_maps_and_a_map_drawn_over_too_much(tmp_path):
    rng = np.random.default_rng(2)
    style = exports.random_style(rng, chrome=True, file_format="png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(exports.encode(exports.render_screenshot(None, None, style, rng), style))
    _refused(empty, "no disk found")
    # the heavy grid with a hatch of 2 px white lines every 6 px over the disks: over 80% of
    # each disk drawn over, too little of the map is left to say what it is
    _, heavy = _screenshot(tmp_path, "heavy", **HEAVY)
    image = cv2.imread(str(heavy))
    inside = np.zeros(image.shape[:2], np.uint8)
    for d in studies.find_disks(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)):
        cv2.circle(inside, (int(d.cx), int(d.cy)), int(d.radius - 3), 1, -1)
    hatched = image.copy()
    for x in range(0, image.shape[1], 6):
        cv2.line(hatched, (x, 0), (x, image.shape[0]), WHITE, 2)
    cv2.imwrite(str(tmp_path / "hatched.png"), np.where(inside[..., None] > 0, hatched, image))
    _refused(tmp_path / "hatched.png", "too little of the map is left")


@pytest.mark.parametrize("seed", [1, 6])
def test_a_heavy_grid_on_a_small_map_reads(tmp_path, seed):
    # 62% and 70% of the disks masked: refused over 60% before; read anyway, the fill taken
    # from 2 px beyond each stroke had little of a cell left between the lines and was off
    # by 0.13-0.15 (measured 2026-12-06); from 1 px beyond, 0.017-0.026
    sim, path = _screenshot(tmp_path, "heavy", seed=seed, **HEAVY)
    study = studies.read_study_image(path, size=SIZE)
    assert 0.6 < study.masked_fraction < 0.8, study.masked_fraction
    assert max(_errors(study, sim)) < 0.03


@pytest.mark.parametrize("seed", [3, 10])
def test_a_jet_map_without_its_bar_is_not_read_through_hot(tmp_path, seed):
    # A clinical map of 60-100% uptake in jet is yellow to dark red, the stretch of hot from
    # its red to its yellow run the other way; without a bar both tables fit alike. Through
    # hot, seed 10 was read upside down (off by 0.45) and seed 3 refused as far below 100%
    sim, path = _screenshot(
        tmp_path, "jet", seed=seed, chrome=False, layout="side", third_map=None,
        colormap="jet", colorbar=None, grid_colour=WHITE, score_colour=CYAN, file_format="jpg",
        jpeg_quality=65, disk_px=200,
    )  # fmt: skip
    study = studies.read_study_image(path, size=SIZE)
    assert max(_errors(study, sim)) < 0.03


def test_third_map_of_another_size_is_still_ambiguous(tmp_path):
    sim, path = _screenshot(
        tmp_path, "three", chrome=False, third_map=None, layout="side", colorbar=None,
        grid_colour=None, score_colour=None, cursor=None, file_format="png", disk_px=160,
    )  # fmt: skip
    image = cv2.imread(str(path))
    wide = cv2.copyMakeBorder(image, 0, 0, 0, 200, cv2.BORDER_REPLICATE)
    cv2.circle(wide, (image.shape[1] + 100, image.shape[0] // 2), 50, (0, 120, 255), -1)
    cv2.imwrite(str(tmp_path / "three.png"), wide)
    _refused(tmp_path / "three.png", "3 disks found where 2")


def test_stress_and_rest_follow_reading_order():
    d = panels.Disk
    row = [d(300, 102, 50), d(100, 98, 50), d(500, 100, 50)]
    assert [p.cx for p in panels.reading_order(row)] == [100, 300, 500]
    square = [d(300, 100, 50), d(100, 300, 50), d(100, 100, 50)]  # 2 x 2, bottom right empty
    assert [(p.cx, p.cy) for p in panels.reading_order(square)] == [
        (100, 100),
        (300, 100),
        (100, 300),
    ]
    column = [d(100, 400, 50), d(104, 100, 50)]
    assert [p.cy for p in panels.reading_order(column)] == [100, 400]


def test_drawn_lines_are_masked_and_filled_from_the_map_around():
    size = 120
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    truth = 0.5 + 0.4 * xx / size  # a smooth map: uptake rising to the right
    uptake = truth.copy()
    uptake[:, 40:43] = 1.0  # a white line, in the table (its top)
    uptake[70:72, :] = 0.0  # a black line, in the table (its bottom)
    far = np.zeros_like(uptake, bool)
    far[20:23, :] = True  # a grey line, off the table
    rgb = np.zeros((size, size, 3), np.uint8)
    filled, drawn = overlays.mask_and_fill(rgb, uptake, far, 60, 60, 58)
    inside = (xx + 0.5 - 60) ** 2 + (yy + 0.5 - 60) ** 2 < 55**2
    lines = inside & ((xx >= 40) & (xx < 43) | (yy >= 70) & (yy < 72) | (yy >= 20) & (yy < 23))
    assert drawn[lines].all()
    assert drawn[inside & ~lines].mean() < 0.02  # the map beside the lines is kept
    assert np.abs(filled - truth)[inside].max() < 0.01


def test_simulated_screenshot_folder_reads_with_its_labels(tmp_path):
    sims = simulate.simulate_dataset(
        tmp_path, 3, seed=4, size=32, difficulty="clinical", export_style="screenshot"
    )
    skipped = []
    found = studies.read_study_folder(tmp_path, size=32, skipped=skipped)
    rows = studies.read_labels(tmp_path / "labels.csv")
    assert {r["filename"].rsplit(".", 1)[1] for r in rows} <= {"png", "jpg"}
    assert len(found) + len(skipped) == 3 and len(found) >= 2
    for study in found:
        i = int(study.name.split("_")[1])
        assert study.label == sims[i].label and study.segments == sims[i].segments
        assert (tmp_path / "masks" / f"{study.name}.npz").exists()


def test_a_maps_panel_near_the_frame_colour_is_background(tmp_path):
    # A dark grey maps panel (67) in a grey window frame (90; seed 5 draws it): 40 RGB levels
    # apart, at the foreground's tolerance, so JPEG's noise of the panel stood out in
    # speckles that, closed, swelled the maps and joined one to its label and the bar's
    # numbers: "one disk where 2" (seeds 5, 6, 10 of 12; study_0142, 0063 of the e2e folder)
    sim, path = _screenshot(
        tmp_path, "near", seed=5, chrome=True, background=67, layout="side", third_map=None,
        colormap="turbo", grid_colour=GREY, grid_thickness=3, colorbar="above",
        file_format="jpg", jpeg_quality=91, disk_px=190,
    )  # fmt: skip
    assert np.abs(cv2.imread(str(path))[0, 0].astype(int) - 90).max() <= 3  # the frame, JPEG
    study = studies.read_study_image(path, size=SIZE)
    assert max(_errors(study, sim)) < 0.03  # measured 0.017


@pytest.mark.parametrize("seed", [4, 10])
def test_the_table_is_chosen_on_the_map_not_its_grid(tmp_path, seed):
    # A 3 px magenta grid with bold grey scores over jet: about half of each disk is left in
    # the map's own colours. Ranked on every pixel, grid included, gist_rainbow (magenta at
    # its top) won: seed 4 was read off by 0.72, seed 10 refused as 17% far from the table
    # (study_0049 of the e2e folder, and study_0001 read off by 0.09)
    sim, path = _screenshot(
        tmp_path, "magenta", seed=seed, chrome=False, layout="side", third_map=None,
        colormap="jet", grid_colour=MAGENTA, grid_thickness=3, score_colour=GREY, font=4,
        font_scale=0.53, font_thickness=2, colorbar=None, file_format="jpg", jpeg_quality=83,
        disk_px=186,
    )  # fmt: skip
    study = studies.read_study_image(path, size=SIZE)
    assert max(_errors(study, sim)) < 0.03  # measured 0.019 and 0.013


def test_a_thin_grid_costs_its_own_width(tmp_path):
    # A 1 px white grid over 200 px maps, PNG: its inner circles and radial lines, about
    # 1400 px long and 2-3 px wide anti-aliased, are 9-14% of a disk; the mask is that line
    # and no band around it (measured 0.12)
    _, path = _screenshot(
        tmp_path, "thin", chrome=False, layout="side", third_map=None, colormap="jet",
        grid_colour=WHITE, grid_thickness=1, score_colour=None, cursor=None, disk_px=200,
        file_format="png",
    )  # fmt: skip
    study = studies.read_study_image(path, size=SIZE)
    assert 0.09 < study.masked_fraction < 0.15, study.masked_fraction

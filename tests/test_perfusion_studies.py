"""Study reading: disk detection, colour bar, uptake recovery, folders and their errors."""

import cv2
import numpy as np
import pytest

from perfusion import colormaps, geometry, simulate, studies


def _write(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_colormap_roundtrip_and_bar():
    u = np.linspace(0, 1, 256)
    for name in ("spectrum", "thermal", "jet"):
        back = colormaps.rgb_to_uptake(colormaps.uptake_to_rgb(u, name), name)
        assert np.abs(back - u).max() <= 4 / 255 + 1e-6  # 8-bit tables repeat a few colours
    img = np.zeros((120, 200, 3), np.uint8)
    img[10:110, 150:165] = colormaps.uptake_to_rgb(np.linspace(1, 0, 100)[:, None], "thermal")
    table = colormaps.colorbar_from_image(img)
    assert table is not None and len(table) >= 90
    # read low -> high: first entries dark, last entries near white
    assert table[:3].astype(int).sum(1).max() < 100 and table[-3:].astype(int).sum(1).min() > 650
    # its near-black end merged with the background, but it is a stretch of "thermal"
    assert colormaps.match_named(table) == "thermal"
    assert colormaps.match_named(table[::-1]) is None


def test_read_study_image_recovers_uptake(tmp_path):
    sim = simulate.simulate_study(np.random.default_rng(1), 64, label="ischemia")
    img = simulate.render_study_image(sim.stress, sim.rest, colormap="thermal", disk_px=150)
    _write(tmp_path / "s.png", img)
    st = studies.read_study_image(tmp_path / "s.png", size=64)  # colour bar, not the name
    inner = geometry.polar_coords(64)[0] < 0.95
    assert np.abs(st.stress_uptake - sim.stress)[inner].mean() < 0.02
    assert np.abs(st.rest_uptake - sim.rest)[inner].mean() < 0.02
    assert st.stress_rgb.shape == (64, 64, 3) and (st.stress_rgb[~st.mask] == 0).all()
    # without the colour bar: the named colormap nearest to the disk colours
    _write(
        tmp_path / "n.png",
        simulate.render_study_image(
            sim.stress, sim.rest, colormap="jet", disk_px=120, colorbar=False
        ),
    )
    st2 = studies.read_study_image(tmp_path / "n.png", size=64)
    assert np.abs(st2.stress_uptake - sim.stress)[inner].mean() < 0.03


def test_disk_detection_geometry():
    img = np.zeros((200, 400, 3), np.uint8)
    cv2.circle(img, (100, 110), 70, (200, 50, 50), -1)
    cv2.circle(img, (300, 100), 60, (50, 200, 50), -1)
    cv2.putText(img, "STRESS", (60, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
    img[20:180, 380:392] = 128  # a bar-like rectangle
    cv2.line(img, (300, 100), (300, 199), (255, 255, 255), 3)  # a tick touching the rim
    cv2.ellipse(img, (100, 40), (30, 20), 0, 0, 360, (0, 0, 0), -1)  # a black defect at the rim
    disks = sorted(studies.find_disks(img), key=lambda d: d.cx)
    assert len(disks) == 2
    assert disks[0].cx == pytest.approx(100, abs=1) and disks[0].radius == pytest.approx(
        70.5, abs=1.5
    )
    assert disks[1].cy == pytest.approx(100, abs=1) and disks[1].radius == pytest.approx(
        60.5, abs=1.5
    )


def test_pair_and_arrays(tmp_path):
    sim = simulate.simulate_study(np.random.default_rng(2), 48, label="infarction")
    for which, u in (("stress", sim.stress), ("rest", sim.rest)):
        disk = colormaps.uptake_to_rgb(cv2.resize(u, (100, 100)), "spectrum")
        disk[~geometry.disk_mask(100)] = 0
        _write(tmp_path / f"p_{which}.png", np.pad(disk, ((20, 20), (20, 20), (0, 0))))
    st = studies.read_study_pair(
        tmp_path / "p_stress.png", tmp_path / "p_rest.png", colormap="spectrum", size=48
    )
    inner = geometry.polar_coords(48)[0] < 0.9
    assert np.abs(st.rest_uptake - sim.rest)[inner].mean() < 0.03
    arr = studies.study_from_arrays(sim.stress, sim.rest, size=48)
    np.testing.assert_allclose(arr.stress_uptake, sim.stress, atol=1e-6)


def test_folder_and_errors(tmp_path):
    simulate.simulate_dataset(tmp_path, 3, seed=0, size=32, disk_px=70)
    got = studies.read_study_folder(tmp_path, size=32)
    assert [s.label for s in got] == [
        r.split(",")[1] for r in (tmp_path / "labels.csv").read_text().splitlines()[1:]
    ]
    (tmp_path / "labels.csv").write_text("filename,label\nstudy_0000.png,weird\n")
    with pytest.raises(ValueError, match="unknown label 'weird'"):
        studies.read_study_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("filename,label\nmissing.png,normal\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        studies.read_study_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        studies.read_study_image(tmp_path / "bad.png")
    blank = np.zeros((100, 100, 3), np.uint8)
    _write(tmp_path / "blank.png", blank)
    with pytest.raises(ValueError, match="blank.png: no disk found"):
        studies.read_study_image(tmp_path / "blank.png")
    cv2.circle(blank, (50, 50), 30, (0, 0, 255), -1)
    _write(tmp_path / "one.png", blank)
    with pytest.raises(ValueError, match="one.png: one disk where 2"):
        studies.read_study_image(tmp_path / "one.png")


@pytest.mark.parametrize("cmap,bar", [("viridis", "vertical"), ("hot", "horizontal")])
def test_reads_a_layout_drawn_by_another_renderer(tmp_path, cmap, bar):
    # A workstation-like export drawn by matplotlib, not by our simulator: titles, a header
    # line, a colour bar beside or below the disks, and a colormap our simulator never uses.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = simulate.simulate_study(np.random.default_rng(3), 96, label="infarction")
    fig = plt.figure(figsize=(6, 3.4), facecolor="black")
    if bar == "vertical":
        axes = [fig.add_axes([0.02, 0.1, 0.42, 0.75]), fig.add_axes([0.46, 0.1, 0.42, 0.75])]
        cax = fig.add_axes([0.91, 0.15, 0.03, 0.65])
    else:
        axes = [fig.add_axes([0.05, 0.25, 0.4, 0.65]), fig.add_axes([0.55, 0.25, 0.4, 0.65])]
        cax = fig.add_axes([0.2, 0.08, 0.6, 0.05])
    outside = ~geometry.disk_mask(96)
    for ax, uptake, title in zip(axes, (sim.stress, sim.rest), ("STRESS", "REST"), strict=True):
        image = ax.imshow(np.ma.masked_where(outside, uptake), cmap=cmap, vmin=0, vmax=1)
        ax.axis("off")
        ax.set_title(title, color="white")
    fig.colorbar(image, cax=cax, orientation=bar).ax.tick_params(colors="white")
    fig.text(0.01, 0.95, "PATIENT 0042  SPECT MPI", color="white", fontsize=8)
    fig.savefig(tmp_path / "export.png", facecolor="black", dpi=100)
    plt.close(fig)

    st = studies.read_study_image(tmp_path / "export.png", size=96)
    inner = geometry.polar_coords(96)[0] < 0.95
    assert np.abs(st.stress_uptake - sim.stress)[inner].mean() < 0.02
    assert np.abs(st.rest_uptake - sim.rest)[inner].mean() < 0.02


def _study_image(seed=4, size=64, **render):
    sim = simulate.simulate_study(np.random.default_rng(seed), size, label="ischemia")
    return sim, simulate.render_study_image(sim.stress, sim.rest, disk_px=120, **render)


def test_refuses_pictures_that_do_not_read_as_polar_maps(tmp_path):
    sim, colour = _study_image()

    def refused(name, rgb, message, **kw):
        _write(tmp_path / name, rgb)
        with pytest.raises(ValueError, match=message) as info:
            studies.read_study_image(tmp_path / name, size=64, **kw)
        assert name in str(info.value) and "\n" not in str(info.value)

    # a colour export converted to grey: the luminance of a rainbow is not monotonic
    grey = np.repeat(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=-1)
    refused("grey.png", grey, "disks are grey")
    flat = np.zeros((300, 600, 3), np.uint8)
    for x in (150, 450):
        cv2.circle(flat, (x, 150), 100, (255, 0, 0), -1)
    refused("flat.png", flat, "one flat colour")
    three = np.zeros((colour.shape[0] + 40, colour.shape[1] + 300, 3), np.uint8)
    three[: colour.shape[0], : colour.shape[1]] = colour
    cv2.circle(three, (colour.shape[1] + 150, 120), 90, (0, 200, 0), -1)
    refused("three.png", three, "3 disks found where 2")
    small = colour.copy()
    small[:, 160:] = small[0, 0]  # the rest disk erased ...
    cv2.circle(small, (230, 110), 30, (250, 120, 0), -1)  # ... and a small orange disk drawn
    refused("sizes.png", small, "differ in size")
    noise = colour.copy()
    disks = studies.find_disks(colour)
    for d in disks:  # random colours on the disks, far from any table
        yy, xx = np.mgrid[: colour.shape[0], : colour.shape[1]]
        inside = (xx - d.cx) ** 2 + (yy - d.cy) ** 2 < (0.95 * d.radius) ** 2
        noise[inside] = np.random.default_rng(0).integers(0, 256, (inside.sum(), 3))
    refused("noise.png", noise, "far from the colour table", colormap="spectrum")
    dim_sim = simulate.render_study_image(0.45 * sim.stress, 0.45 * sim.rest, disk_px=120)
    refused("dim.png", dim_sim, "hottest part of the disk reads")
    # a real grey-table export is read when the grey table is chosen on purpose
    _, grey_export = _study_image(colormap="gray", colorbar=False)
    refused("grey_export.png", grey_export, "disks are grey")
    st = studies.read_study_image(tmp_path / "grey_export.png", size=64, colormap="gray")
    inner = geometry.polar_coords(64)[0] < 0.95
    assert np.abs(st.stress_uptake - sim.stress)[inner].mean() < 0.02


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    from cardiac_core import images

    _, colour = _study_image()
    _write(tmp_path / "s.png", colour)
    with pytest.raises(images.ImageTooLarge, match=r"s\.png"):
        images.set_max_pixels(1000)
        try:
            studies.read_study_image(tmp_path / "s.png", size=64)
        finally:
            images.set_max_pixels(images.DEFAULT_MAX_PIXELS)


def test_labels_csv_bom_line_numbers_and_header_only(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_bytes(b"\xef\xbb\xbffilename,label,sex\r\na.png,normal,F\r\nb.png,MI,m\r\n")
    rows = studies.read_labels(p)
    assert [(r["filename"], r["label"], r["sex"]) for r in rows] == [
        ("a.png", "normal", "F"), ("b.png", "infarction", "M")
    ]  # fmt: skip
    p.write_text("sex,label,file\nF,ischemia,c.png\n")  # columns in any order
    assert studies.read_labels(p)[0]["filename"] == "c.png"
    p.write_text("a.png,normal\n\nb.png,weird\n")  # no header: line 3 is the bad one
    with pytest.raises(ValueError, match="labels.csv line 3: unknown label 'weird'"):
        studies.read_labels(p)
    p.write_text("filename,label\na.png,normal\nb.png,weird\n")
    with pytest.raises(ValueError, match="labels.csv line 3: unknown label"):
        studies.read_labels(p)
    p.write_text("filename,label,territories\n")
    with pytest.raises(ValueError, match="no studies listed, only a header row"):
        studies.read_labels(p)
    p.write_text("name,label\na.png,normal\n")
    with pytest.raises(ValueError, match="needs filename and label columns"):
        studies.read_labels(p)
    p.write_bytes("filename,label\nä.png,normal\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        studies.read_labels(p)


def test_folder_reading_can_skip_bad_studies(tmp_path):
    simulate.simulate_dataset(tmp_path, 3, seed=0, size=32, disk_px=70)
    names = [r["filename"] for r in studies.read_labels(tmp_path / "labels.csv")]
    (tmp_path / "images" / names[1]).write_bytes(b"broken")
    with pytest.raises(ValueError, match=names[1]):
        studies.read_study_folder(tmp_path, size=32)
    skipped = []
    got = studies.read_study_folder(tmp_path, size=32, skipped=skipped)
    assert [s.name + ".png" for s in got] == [names[0], names[2]]
    assert [f for f, _ in skipped] == [names[1]] and "not a readable image" in skipped[0][1]


def test_dicom_secondary_capture_polar_maps(tmp_path):
    from cardiac_core import dicom

    inner = geometry.polar_coords(64)[0] < 0.95
    sims, exports = [], []
    for seed in (5, 6):
        sim, rgb = _study_image(seed=seed)
        sims.append(sim)
        exports.append(rgb)
    one = dicom.write_test_cine(tmp_path / "one.dcm", exports[0])
    st = studies.read_study_image(one, size=64)
    assert st.name == "one" and np.abs(st.stress_uptake - sims[0].stress)[inner].mean() < 0.02
    # multi-frame: one study per frame
    multi = dicom.write_test_cine(tmp_path / "multi.dcm", np.stack(exports))
    both = studies.read_study_file(multi, size=64)
    assert [s.name for s in both] == ["multi#1", "multi#2"]
    for s, sim in zip(both, sims, strict=True):
        assert np.abs(s.rest_uptake - sim.rest)[inner].mean() < 0.02
    with pytest.raises(ValueError, match="holds 2 studies"):
        studies.read_study_image(multi, size=64)
    # two frames of one disk each: stress, then rest
    disks = studies.find_disks(exports[0])
    crops = []
    for d in sorted(disks, key=lambda d: d.cx):
        r = int(d.radius) + 6
        crops.append(exports[0][int(d.cy) - r : int(d.cy) + r, int(d.cx) - r : int(d.cx) + r])
    h = min(c.shape[0] for c in crops)
    pair = dicom.write_test_cine(tmp_path / "pair.dcm", np.stack([c[:h, :h] for c in crops]))
    st = studies.read_study_image(pair, size=64, colormap="spectrum")
    assert np.abs(st.rest_uptake - sims[0].rest)[inner].mean() < 0.02
    # a palette-colour export: indices into the spectrum table
    table = colormaps.get_colormap("spectrum")
    uptake, distance = colormaps.rgb_to_uptake(exports[0], table, return_distance=True)
    # exact table colours become their index; background and anti-aliased rims index 0 (black)
    index = np.where(distance == 0, np.rint(uptake * 255), 0).astype(np.uint8)
    palette = dicom.write_test_cine(tmp_path / "pal.dcm", index, palette=table)
    st = studies.read_study_image(palette, size=64, colormap="spectrum")
    assert np.abs(st.stress_uptake - sims[0].stress)[inner].mean() < 0.02

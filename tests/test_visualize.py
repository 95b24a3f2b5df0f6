import numpy as np
import pytest

from tavr_jax import visualize
from tavr_jax.schema import get_schema


def _frame():
    return np.full((96, 96), 90, np.uint8)


def test_draw_keypoints_colours_points_by_group_and_skips_invisible():
    schema = get_schema("paper11")
    k = schema.num_points
    coords = np.stack([np.linspace(10, 86, k), np.full(k, 48.0)], axis=1)
    visible = np.ones(k, bool)
    visible[schema.index("CT")] = False
    out = visualize.draw_keypoints(_frame(), coords, visible, schema, labels=False)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    for i, name in enumerate(schema.point_names):
        x, y = np.round(coords[i]).astype(int)
        pixel = tuple(int(v) for v in out[y, x])
        if visible[i]:
            # The filled centre dot has exactly the group colour.
            assert pixel == visualize.group_color(schema.point_group[i]), name
        else:
            assert pixel == (90, 90, 90), name


def test_draw_keypoints_cross_marks_centre_and_keeps_input():
    schema = get_schema("paper11")
    img = _frame()
    coords = np.full((schema.num_points, 2), 40.0)
    visible = np.zeros(schema.num_points, bool)
    visible[0] = True
    out = visualize.draw_keypoints(img, coords, visible, schema, marker="cross", labels=False)
    assert tuple(int(v) for v in out[40, 40]) == visualize.GROUP_COLORS[0]
    assert (img == 90).all()  # input untouched
    # Only pixels near the marker changed.
    changed = np.argwhere((out != 90).any(axis=2))
    assert np.abs(changed - 40).max() <= 3


def test_draw_keypoints_rejects_bad_shapes():
    schema = get_schema("paper11")
    with pytest.raises(ValueError, match="11 points"):
        visualize.draw_keypoints(_frame(), np.zeros((3, 2)), np.ones(3), schema)
    with pytest.raises(ValueError, match="marker"):
        visualize.draw_keypoints(
            _frame(), np.zeros((11, 2)), np.ones(11), schema, marker="star", labels=False
        )


def test_group_colours_are_distinct():
    assert len(set(visualize.GROUP_COLORS)) == len(visualize.GROUP_COLORS)


def test_contact_sheet_places_tiles_row_major():
    a = np.full((4, 5), 10, np.uint8)
    b = np.full((3, 5, 3), 20, np.uint8)
    c = np.full((4, 2), 30, np.uint8)
    sheet = visualize.contact_sheet([a, b, c], ncols=2, gap=1)
    expected = np.zeros((4 + 1 + 4, 5 + 1 + 5, 3), np.uint8)
    expected[0:4, 0:5] = 10
    expected[0:3, 6:11] = 20
    expected[5:9, 0:2] = 30
    np.testing.assert_array_equal(sheet, expected)

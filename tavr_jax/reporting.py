"""From probabilities to reported points: per-point thresholds, group gating, stage priors.

All functions are vectorised numpy over any leading batch shape `(..., K)` / `(..., G)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tavr_jax.schema import KeypointSchema


def thresholds(x, n: int, what: str, default: float = 0.5) -> np.ndarray:
    """A scalar or (n,) thresholds (None: `default`) -> (n,) float64, checked."""
    t = np.full((n,), default) if x is None else np.asarray(x, np.float64)
    if t.ndim == 0:
        t = np.full((n,), float(t))
    if t.shape != (n,):
        raise ValueError(f"{what} thresholds must be a scalar or have shape ({n},), got {t.shape}")
    return t


def expected_groups(expect, schema: KeypointSchema) -> np.ndarray:
    """Stage prior -> (G,) bool: `None`/empty = every group; else names (list or 'a,b')."""
    if expect is None or (isinstance(expect, str) and not expect.strip()):
        return np.ones((schema.num_groups,), bool)
    names = [s.strip() for s in expect.split(",")] if isinstance(expect, str) else list(expect)
    unknown = [n for n in names if n not in schema.group_names]
    if unknown:
        raise ValueError(
            f"--expect names unknown group(s) {', '.join(unknown)}; schema {schema.name!r} has "
            f"{', '.join(schema.group_names)}"
        )
    return np.isin(np.array(schema.group_names), names)


def reported_points(
    visibility: np.ndarray,
    group: np.ndarray | None,
    schema: KeypointSchema,
    *,
    point_thresholds=None,
    group_thresholds=None,
    expected: np.ndarray | Sequence[str] | str | None = None,
) -> np.ndarray:
    """(..., K) bool: the points to report.

    A point is reported when its visibility passes its threshold, its group's probability
    passes the group threshold (group gating, as the paper does; none when `group` is None)
    and its group is expected at this stage of the procedure (all groups when `expected` is
    None). Thresholds default to 0.5. This is the one rule: metrics count what it reports.
    """
    k, g = schema.num_points, schema.num_groups
    probability = np.asarray(visibility, np.float64)
    shape = probability.shape[:-1]
    presence = np.ones((*shape, g)) if group is None else np.asarray(group, np.float64)
    if probability.shape[-1] != k or presence.shape[-1] != g or presence.shape[:-1] != shape:
        raise ValueError(f"expected (..., {k}) visibility and (..., {g}) group, got "
                         f"{probability.shape} and {presence.shape}")  # fmt: skip
    exp = expected if isinstance(expected, np.ndarray) else expected_groups(expected, schema)
    group_on = exp if group is None else (presence > thresholds(group_thresholds, g, "group")) & exp
    return (probability > thresholds(point_thresholds, k, "point")) & group_on[
        ..., schema.point_group
    ]


class Gate:
    """Thresholds and stage prior of one run, applied frame by frame or to whole batches."""

    def __init__(self, schema: KeypointSchema, *, point_thresholds=None, group_thresholds=None,
                 expect=None):  # fmt: skip
        self.schema = schema
        self.point_thresholds = thresholds(point_thresholds, schema.num_points, "point")
        self.group_thresholds = thresholds(group_thresholds, schema.num_groups, "group")
        self.expected = expected_groups(expect, schema)

    @classmethod
    def from_meta(cls, meta: dict, schema: KeypointSchema, *, expect=None) -> Gate:
        """Thresholds from `load_for_inference` meta (W/thresholds.json), 0.5 when absent."""
        return cls(
            schema,
            point_thresholds=meta.get("thresholds"),
            group_thresholds=meta.get("group_thresholds"),
            expect=expect,
        )

    def __call__(self, visibility, group) -> np.ndarray:
        return reported_points(
            visibility,
            group,
            self.schema,
            point_thresholds=self.point_thresholds,
            group_thresholds=self.group_thresholds,
            expected=self.expected,
        )

"""Keypoint schemas as data: groups of named points, flip pairs, ignored classes.

Every other module takes a `KeypointSchema` argument; point names live only in the JSON
files beside this module (or in a user's own JSON file passed by path).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import numpy as np

_SCHEMA_DIR = pathlib.Path(__file__).parent / "schemas"
DEFAULT_SCHEMA = "paper11"


@dataclasses.dataclass(frozen=True)
class KeypointSchema:
    """Disjoint groups of keypoints that appear and disappear together."""

    name: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # ((group name, (point names...)), ...)
    flip_pairs: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()  # annotation classes that are known but not predicted
    # (point, next point along its curve): points that mark where a curve (the delivery
    # catheter) enters the field of view. A zoom or rotation that pushes one out of the image
    # does not hide it: the curve still enters, at the image's new edge (`augment`).
    entry_points: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        names = self.point_names
        if len(set(names)) != len(names):
            raise ValueError(f"schema {self.name!r}: duplicate point names in {names}")
        for pair in (*self.flip_pairs, *self.entry_points):
            if len(pair) != 2:
                raise ValueError(f"schema {self.name!r}: {list(pair)} is not a pair of point names")
        for a, b in self.flip_pairs:
            if a not in names or b not in names:
                raise ValueError(f"schema {self.name!r}: flip pair ({a}, {b}) names unknown points")
        for a, b in self.entry_points:
            if a not in names or b not in names or a == b:
                raise ValueError(
                    f"schema {self.name!r}: entry point ({a}, {b}) needs two distinct known points"
                )

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g for g, _ in self.groups)

    @property
    def point_names(self) -> tuple[str, ...]:
        return tuple(p for _, pts in self.groups for p in pts)

    @property
    def num_points(self) -> int:
        return len(self.point_names)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(len(pts) for _, pts in self.groups)

    @property
    def max_group_size(self) -> int:
        return max(self.group_sizes)

    @property
    def point_group(self) -> np.ndarray:
        """(K,) int: the group index of each point."""
        return np.repeat(np.arange(self.num_groups), self.group_sizes)

    @property
    def group_matrix(self) -> np.ndarray:
        """(G, K) float32 one-hot membership; `visible @ group_matrix.T > 0` is presence."""
        m = np.zeros((self.num_groups, self.num_points), np.float32)
        m[self.point_group, np.arange(self.num_points)] = 1.0
        return m

    @property
    def padded_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Gather indices for the (G, max_group_size) padded layout used by grouped heads.

        Returns (index, valid): index (G, M) int into the K points (0 where padded),
        valid (G, M) bool.
        """
        g, m = self.num_groups, self.max_group_size
        index = np.zeros((g, m), np.int32)
        valid = np.zeros((g, m), bool)
        start = 0
        for i, n in enumerate(self.group_sizes):
            index[i, :n] = np.arange(start, start + n)
            valid[i, :n] = True
            start += n
        return index, valid

    @property
    def flip_permutation(self) -> np.ndarray:
        """(K,) int: point i of a horizontally flipped image is point perm[i] of the original."""
        perm = np.arange(self.num_points)
        for a, b in self.flip_pairs:
            ia, ib = self.index(a), self.index(b)
            perm[ia], perm[ib] = ib, ia
        return perm

    @property
    def entry_partner(self) -> np.ndarray:
        """(K,) int: for an entry point, the index of the next point along its curve; else -1."""
        partner = np.full(self.num_points, -1)
        for a, b in self.entry_points:
            partner[self.index(a)] = self.index(b)
        return partner

    def index(self, point_name: str) -> int:
        try:
            return self.point_names.index(point_name)
        except ValueError:
            raise KeyError(f"point {point_name!r} is not in schema {self.name!r}") from None

    def group_of(self, point_name: str) -> str:
        return self.group_names[self.point_group[self.index(point_name)]]

    def group_presence(self, visible: np.ndarray) -> np.ndarray:
        """(..., K) visible flags -> (..., G) bool: a group is present if any of its points is."""
        v = np.asarray(visible, np.float32)
        return (v @ self.group_matrix.T) > 0

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "groups": [{"name": g, "points": list(p)} for g, p in self.groups],
            "flip_pairs": [list(p) for p in self.flip_pairs],
            "ignore": list(self.ignore),
        }
        if self.entry_points:
            d["entry_points"] = [list(p) for p in self.entry_points]
        return d

    @classmethod
    def from_json(cls, d: dict) -> KeypointSchema:
        try:
            return cls(
                name=d["name"],
                groups=tuple((g["name"], tuple(g["points"])) for g in d["groups"]),
                flip_pairs=tuple(tuple(p) for p in d.get("flip_pairs", ())),
                ignore=tuple(d.get("ignore", ())),
                entry_points=tuple(tuple(p) for p in d.get("entry_points", ())),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed schema JSON (missing or bad field {e})") from None


def available_schemas() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in _SCHEMA_DIR.glob("*.json")))


@functools.cache
def get_schema(name_or_path: str = DEFAULT_SCHEMA) -> KeypointSchema:
    """A schema by name (`paper11`, `reference10`) or by path to a JSON file."""
    path = pathlib.Path(name_or_path)
    if path.suffix != ".json":
        path = _SCHEMA_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ValueError(
                f"unknown keypoint schema {name_or_path!r}; known: {', '.join(available_schemas())}"
                " (or pass a path to a schema .json file)"
            )
    try:
        return KeypointSchema.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read schema file {path}: {e}") from None

"""The published 84 strip/ring features of a polar map, in jnp (jit + vmap).

Per colour channel the (S, S) map is cut into 5 vertical strips, 5 horizontal strips and 4
concentric rings (equal radial width, out to the inscribed disk); for each part the mean and
standard deviation of the non-black pixels are taken (black = the painted edge and background).

Feature order (84 = 3 channels x 14 parts x 2 stats):
    index = channel * 28 + part * 2 + stat
    channel: 0 R, 1 G, 2 B
    part:    0-4 vertical strips (left to right), 5-9 horizontal strips (top to bottom),
             10-13 rings (centre outwards)
    stat:    0 mean, 1 std (population, ddof=0)
A part with no non-black pixel gives mean 0 and std 0. Values are in the input's units
(0-255 for uint8 maps).

8-bit maps (what a study gives) take an exact one-pass path: int32 sums of x and x^2 per
column, row and ring block, and the variance around an integer shift (_exact_moments), with
no float cancellation and no second pass over the pixels. Float maps, and maps too large for
int32 sums, take a two-pass float32 path (means, then squared deviations).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NUM_STRIPS = 5
NUM_RINGS = 4
NUM_PARTS = 2 * NUM_STRIPS + NUM_RINGS  # 14
NUM_FEATURES = 3 * NUM_PARTS * 2  # 84
PART_NAMES = tuple(
    [f"vstrip{i}" for i in range(NUM_STRIPS)]
    + [f"hstrip{i}" for i in range(NUM_STRIPS)]
    + [f"ring{i}" for i in range(NUM_RINGS)]
)
FEATURE_NAMES = tuple(f"{c}_{p}_{s}" for c in "RGB" for p in PART_NAMES for s in ("mean", "std"))


def strip_index(size: int) -> np.ndarray:
    """(S,) int: strip (0..4) of each row / column, equal widths."""
    return np.arange(size) * NUM_STRIPS // size


def ring_index(size: int) -> np.ndarray:
    """(S, S) int: ring (0..3) of each pixel by radius of its centre, -1 outside the disk."""
    centre = size / 2.0
    c = (np.arange(size) + 0.5 - centre) / centre
    r = np.hypot(c[None, :], c[:, None])
    return np.where(r <= 1.0, np.minimum((r * NUM_RINGS).astype(np.int64), NUM_RINGS - 1), -1)


@functools.lru_cache(maxsize=8)
def region_masks(size: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot region masks: strips (5, S) float32 (rows or columns), rings (4, S, S) float32."""
    strips = (strip_index(size)[None, :] == np.arange(NUM_STRIPS)[:, None]).astype(np.float32)
    rings = (ring_index(size)[None] == np.arange(NUM_RINGS)[:, None, None]).astype(np.float32)
    return strips, rings


# Rings are summed over ring-ordered blocks of pixels: one gather puts each ring's pixels in
# whole rows of _BLOCK, so a ring is a plain reduction like a strip. On CPU this is ~1.4x
# faster than an (S*S, 4) one-hot contraction, whose 3-wide output defeats the GEMM.
_BLOCK = 128


@functools.lru_cache(maxsize=8)
def ring_blocks(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ring-ordered pixel blocks: flat pixel index (NB, _BLOCK) int32, ring of each block (NB,)
    int32, and per ring the number of padding entries (4,) int32, which all point at pixel 0."""
    flat = ring_index(size).reshape(-1)
    index, block_ring, padding = [], [], []
    for ring in range(NUM_RINGS):
        pixels = np.flatnonzero(flat == ring)
        blocks = -(-len(pixels) // _BLOCK)
        index.append(np.pad(pixels, (0, blocks * _BLOCK - len(pixels))))
        block_ring += [ring] * blocks
        padding.append(blocks * _BLOCK - len(pixels))
    return (
        np.concatenate(index).astype(np.int32).reshape(-1, _BLOCK),
        np.asarray(block_ring, np.int32),
        np.asarray(padding, np.int32),
    )


def _exact_moments(s1, s2, n):
    """Mean and std of integer data from int32 sums s1 = sum x, s2 = sum x^2 over n pixels.

    E[x^2] - mean^2 would cancel catastrophically in float32, so the variance is taken around
    an integer shift c = s1 // n: t = sum (x - c)^2 = s2 - 2c s1 + n c^2 is computed in int32.
    The products may wrap, but two's complement arithmetic is exact modulo 2^32 and the true
    t is below 2^31 (see _integer_path_fits), so t comes out exact; the float32 rest only
    divides and rounds, with nothing left to cancel.
    """
    n = jnp.maximum(n, 1)
    c = s1 // n
    t = s2 - 2 * c * s1 + n * c * c
    nf = n.astype(jnp.float32)
    offset = (s1 - n * c).astype(jnp.float32) / nf  # mean - c, in [0, 1)
    var = t.astype(jnp.float32) / nf - offset**2
    return s1.astype(jnp.float32) / nf, jnp.sqrt(jnp.maximum(var, 0.0))


def _integer_map_features(m, valid, strips, pixel, block_ring, padding):
    """84 features of one 8-bit map, exact, in one pass over the pixels.

    m (S,S,3) uint8; valid (S,S) bool, or None for the non-black pixels; strips (S, 5) one-hot
    int32; pixel and padding as from ring_blocks, block_ring one-hot (NB, 4) int32. Every sum
    is an int32 reduction of x, x^2 or the valid count over a column, a row or a ring block.
    """
    ring_m = m.reshape(-1, 3)[pixel.reshape(-1)].reshape(*pixel.shape, 3)
    if valid is None:  # black pixels add nothing to the sums: only the counts need the mask
        valid = jnp.any(m != 0, axis=-1)
        ring_valid = jnp.any(ring_m != 0, axis=-1)
    else:
        ring_valid = valid.reshape(-1)[pixel]
        m = jnp.where(valid[..., None], m, 0)
        ring_m = jnp.where(ring_valid[..., None], ring_m, 0)
    x, xr = m.astype(jnp.int32), ring_m.astype(jnp.int32)
    v, vr = valid.astype(jnp.int32), ring_valid.astype(jnp.int32)

    def sums(a, ar):  # (14, ...) sums over the parts; the ring padding repeats pixel 0
        rings = block_ring.T @ ar.sum(1) - jnp.outer(padding, a[0, 0]).reshape(-1, *a.shape[2:])
        return jnp.concatenate([strips.T @ a.sum(0), strips.T @ a.sum(1), rings])

    s1 = sums(x, xr)  # (14, 3)
    s2 = sums(x * x, xr * xr)
    n = sums(v, vr)  # (14,)
    mean, std = _exact_moments(s1, s2, n[:, None])
    return jnp.stack([mean.T, std.T], axis=-1).reshape(NUM_FEATURES)  # channel, part, stat


def _float_map_features(m, valid, strips, rings):
    """84 features of one float map: m (S,S,3), valid (S,S) bool, strips (5,S), rings (4,S*S)."""
    size = m.shape[0]
    x = m.astype(jnp.float32).transpose(2, 0, 1)  # (3, S, S): channel planes vectorise well
    v = valid.astype(jnp.float32)[None]  # (1, S, S)
    xv = x * v
    # Strips are separable: reduce over the other axis, then a (5, S) one-hot matmul (S/5 times
    # cheaper than a (5, S, S) one-hot einsum). Rings need their (4, S*S) one-hot masks.
    count_v = jnp.maximum(strips @ v[0].sum(0), 1.0)  # (5,) vertical strips = column groups
    count_h = jnp.maximum(strips @ v[0].sum(1), 1.0)  # (5,) horizontal strips = row groups
    count_r = jnp.maximum(rings @ v.reshape(-1), 1.0)  # (4,)
    mean_v = (xv.sum(1) @ strips.T) / count_v[None]  # (3, 5)
    mean_h = (xv.sum(2) @ strips.T) / count_h[None]
    mean_r = (xv.reshape(3, -1) @ rings.T) / count_r[None]  # (3, 4)
    # Second pass: squared deviations from each pixel's own region mean, so float32 keeps its
    # precision (E[x^2] - mean^2 would cancel catastrophically at the 0-255 scale).
    dev_v = (x - (mean_v @ strips)[:, None, :]) ** 2 * v
    dev_h = (x - (mean_h @ strips)[:, :, None]) ** 2 * v
    dev_r = (x - (mean_r @ rings).reshape(3, size, size)) ** 2 * v
    var_v = (dev_v.sum(1) @ strips.T) / count_v[None]
    var_h = (dev_h.sum(2) @ strips.T) / count_h[None]
    var_r = (dev_r.reshape(3, -1) @ rings.T) / count_r[None]
    mean = jnp.concatenate([mean_v, mean_h, mean_r], axis=-1)  # (3, 14)
    std = jnp.sqrt(jnp.concatenate([var_v, var_h, var_r], axis=-1))
    return jnp.stack([mean, std], axis=-1).reshape(NUM_FEATURES)  # channel, part, stat


@functools.lru_cache(maxsize=8)
def _integer_path_fits(size: int) -> bool:
    """Whether sum (x - c)^2 of the largest part stays below 2^31 for any 8-bit data.

    With c = floor(mean), that sum is at most n * (127.5^2 + 1) for n pixels.
    """
    rings = ring_index(size)
    strip_pixels = size * np.bincount(strip_index(size)).max()
    ring_pixels = np.bincount(rings[rings >= 0]).max()
    return max(strip_pixels, ring_pixels) * (127.5**2 + 1) < 2**31


# Maps go through in small vmapped chunks (lax.map): a chunk's intermediates stay in cache,
# which on CPU is several times faster than one vmap over the whole batch. The integer path
# is fastest at about two 256 x 256 maps per chunk (measured at 128, 256 and 512 px).
_INTEGER_CHUNK_PIXELS = 2 * 256 * 256
_FLOAT_CHUNK = 4


@jax.jit
def _integer_batch_features(maps, valid):
    size = maps.shape[1]
    strips, _ = region_masks(size)
    pixel, block_ring, padding = ring_blocks(size)
    one = functools.partial(
        _integer_map_features,
        strips=jnp.asarray(strips.T, jnp.int32),
        pixel=jnp.asarray(pixel),
        block_ring=jnp.asarray(block_ring[:, None] == np.arange(NUM_RINGS), jnp.int32),
        padding=jnp.asarray(padding),
    )
    chunk = max(1, _INTEGER_CHUNK_PIXELS // (size * size))
    return jax.lax.map(lambda mv: one(*mv), (maps, valid), batch_size=chunk)


@jax.jit
def _float_batch_features(maps, valid):
    size = maps.shape[1]
    strips, rings = region_masks(size)
    one = functools.partial(
        _float_map_features, strips=strips, rings=rings.reshape(NUM_RINGS, size * size)
    )
    return jax.lax.map(lambda mv: one(*mv), (maps, valid), batch_size=_FLOAT_CHUNK)


def black_mask(maps) -> jax.Array:
    """(B, S, S) bool: pixels that are black in every channel."""
    return jnp.all(jnp.asarray(maps) == 0, axis=-1)


def strip_ring_features(maps, mask=None) -> jax.Array:
    """(B, 84) float32 features of (B, S, S, 3) maps (uint8 or float).

    mask: optional (S, S) or (B, S, S) bool of pixels to use; by default the non-black pixels.
    """
    maps = jnp.asarray(maps)
    if maps.ndim == 3:
        maps = maps[None]
    if maps.ndim != 4 or maps.shape[-1] != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"expected maps (B, S, S, 3), got shape {maps.shape}")
    valid = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), maps.shape[:3])
    if maps.dtype == jnp.uint8 and _integer_path_fits(maps.shape[1]):
        return _integer_batch_features(maps, valid)
    return _float_batch_features(maps, ~black_mask(maps) if valid is None else valid)


def study_features(stress, rest, mask=None) -> jax.Array:
    """(B, 252): stress, rest and stress-minus-rest features of (B, S, S, 3) map pairs."""
    fs = strip_ring_features(stress, mask)
    fr = strip_ring_features(rest, mask)
    return jnp.concatenate([fs, fr, fs - fr], axis=-1)


STUDY_FEATURE_NAMES = tuple(
    f"{which}_{n}" for which in ("stress", "rest", "diff") for n in FEATURE_NAMES
)


def strip_ring_features_loop(maps, mask=None) -> np.ndarray:
    """Straightforward numpy loop over maps, channels and parts (float64): the reference."""
    maps = np.asarray(maps)
    if maps.ndim == 3:
        maps = maps[None]
    b, size = maps.shape[0], maps.shape[1]
    strip = strip_index(size)
    ring = ring_index(size)
    out = np.zeros((b, NUM_FEATURES))
    for i in range(b):
        m = maps[i].astype(np.float64)
        valid = (
            ~np.all(maps[i] == 0, axis=-1)
            if mask is None
            else np.broadcast_to(np.asarray(mask, bool), maps.shape[:3])[i]
        )
        cols = np.broadcast_to(strip[None, :], (size, size))
        rows = np.broadcast_to(strip[:, None], (size, size))
        parts = [cols == k for k in range(NUM_STRIPS)] + [rows == k for k in range(NUM_STRIPS)]
        parts += [ring == k for k in range(NUM_RINGS)]
        for c in range(3):
            for p, region in enumerate(parts):
                values = m[..., c][region & valid]
                if values.size:
                    out[i, c * 28 + p * 2] = values.mean()
                    out[i, c * 28 + p * 2 + 1] = values.std()
    return out


UPTAKE_FEATURE_NAMES = tuple(
    f"uptake_{c}_{p}_{s}" for c in ("stress", "rest", "change") for p in PART_NAMES
    for s in ("mean", "std")
)  # fmt: skip


def uptake_features(stress, rest) -> np.ndarray:
    """(B, 84) float32: the strip/ring features of the uptake itself, over the LV disk.

    The channels are stress, rest and stress minus rest uptake in place of R, G and B. Unlike
    the colour features they do not depend on the colour table a map was drawn in, and unlike
    the features against normal limits they need no normal studies, so they hold when the
    limits are noisy (a folder with few normals) or a normal heart sits off them everywhere.
    """
    stress = np.asarray(stress, np.float32)
    maps = np.stack([stress, np.asarray(rest, np.float32)], axis=-1)
    maps = np.concatenate([maps, maps[..., :1] - maps[..., 1:]], axis=-1)
    disk = ring_index(stress.shape[-1]) >= 0
    return np.asarray(strip_ring_features(maps, disk), np.float32)


def study_feature_matrix(studies, *, batch: int = 64) -> np.ndarray:
    """(N, 252) float32 stress / rest / stress-minus-rest features of perfusion.studies.Study."""
    out = []
    for start in range(0, len(studies), batch):
        chunk = studies[start : start + batch]
        stress = np.stack([s.stress_rgb for s in chunk])
        rest = np.stack([s.rest_rgb for s in chunk])
        out.append(np.asarray(study_features(stress, rest)))
    return np.concatenate(out, axis=0) if out else np.zeros((0, 3 * NUM_FEATURES), np.float32)

"""Winograd F(4x4, 3x3): a 3x3 convolution computed on 6x6 input tiles taken every 4 pixels.

Y = A^T [(G g G^T) * (B^T d B)] A for a tile d and a kernel g (Lavin and Gray, 2016), with the
interpolation points 0, +-1, +-2 and infinity. It costs 36 multiplications per 4x4 block of
outputs and pair of channels instead of 144. onnxruntime's CPU convolutions compute directly,
so `write_conv` writes these transforms into the ONNX graph, for the convolutions a rule picks:
`FIXED` (`pays`, sizes timed on one machine) or a rule measured on the machine at hand
(`winograd_measure.MeasuredRule`).
"""

from __future__ import annotations

import numpy as np

BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
              np.float64)  # fmt: skip
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])  # fmt: skip
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float64)  # fmt: skip
TILE, OUT = 6, 4  # 6x6 input tiles give 4x4 outputs

# The fixed rule, from `bench_winograd.py` on one AMD EPYC (docs/latency.md): the transforms are
# memory passes, so only wide layers with many tiles gained. At C_in >= 128 and
# C_in * C_out * H * W >= 2^26 per frame it took 0.56-0.90 of the direct convolution's time; on
# 64 channels or on 8x8 maps, 1.3-1.6x. An Intel Xeon lost with the same rule (1.06-1.19x the
# peer's time), hence the measured rule, the export's default.
MIN_CHANNELS = 128
MIN_MACS = 2**26


def whole_tiles(hw) -> bool:
    """Whether an (H, W) map splits into whole 4x4 output tiles, as `write_conv` needs."""
    return hw[0] % OUT == 0 and hw[1] % OUT == 0


def pays(c_in: int, c_out: int, hw) -> bool:
    """The fixed rule: whether a 3x3, stride-1, SAME convolution of this size is Winograd."""
    h, w = hw
    return whole_tiles(hw) and c_in >= MIN_CHANNELS and c_in * c_out * h * w >= MIN_MACS


class FixedRule:
    """`pays` as a rule: a callable (c_in, c_out, (h, w)) -> bool, with what the file records."""

    def __call__(self, c_in: int, c_out: int, hw) -> bool:
        return pays(c_in, c_out, hw)

    def metadata(self) -> dict:
        return {"winograd_rule": "fixed"}


FIXED = FixedRule()
OFF_METADATA = {"winograd_rule": "off"}


def input_filters() -> np.ndarray:
    """(36, 1, 6, 6): filter 6i + j gives (B^T d B)[i, j] of a 6x6 tile d."""
    return np.einsum("iy,jx->ijyx", BT, BT).reshape(TILE * TILE, 1, TILE, TILE)


def output_matrix() -> np.ndarray:
    """(16, 36): row 4r + s gives (A^T m A)[r, s] from the 36 products m[6i + j]."""
    return np.einsum("ri,sj->rsij", AT, AT).reshape(OUT * OUT, TILE * TILE)


def write_conv(g, x: str, kernel: np.ndarray, bias: np.ndarray, hw) -> str:
    """A 3x3, stride-1, SAME convolution (OIHW kernel) of an (N, C, H, W) input, H and W
    multiples of 4, as Winograd F(4x4, 3x3) in the ONNX graph `g` (`onnx_export.Graph`):

    1. the input transform B^T d B of every 6x6 tile (stride 4, one pixel of zero padding):
       a convolution with C groups of 36 fixed 6x6 filters -> (N, C*36, H/4, W/4);
    2. the product with the transformed kernel G g G^T: for each of the 36 tile positions a
       C -> K matrix product, one 1x1 convolution with 36 groups once the channels are
       ordered (position, channel);
    3. the output transform A^T m A as one (16, 36) matrix product, DepthToSpace to place
       each 4x4 tile, and the bias. (A transposed convolution with K groups does the same
       in one node but took 0.8 ms a layer more.)

    In float32 each layer agrees with the direct convolution to about 1e-5 of its range.
    """
    a, m = TILE, OUT  # 6x6 tiles in, 4x4 out
    t = a * a
    c_out, c_in = kernel.shape[:2]
    th, tw = hw[0] // m, hw[1] // m  # tiles

    def shape(*dims):  # 0 keeps the batch
        return g.const(np.array(dims, np.int64), "shape")

    # The file stores the 3x3 kernel and one copy of each transform; the nodes that tile
    # and transform them have constant inputs only, so onnxruntime folds them once when
    # the session is made (the transformed kernel is 4x the size: in memory, not on disk).
    # v[n, 36c + 6i + j] = sum_{y, x} BT[i, y] d[n, c, y, x] BT[j, x]
    v_filters = g.op("Tile", g.const(input_filters(), "winograd_bt"), shape(c_in, 1, 1, 1))
    v = g.op("Conv", x, v_filters, kernel_shape=[a, a], strides=[m, m], pads=[1] * 4,
             group=c_in)  # fmt: skip
    v = g.op("Transpose", g.op("Reshape", v, shape(0, c_in, t, th * tw)), perm=[0, 2, 1, 3])
    v = g.op("Reshape", v, shape(0, t * c_in, th, tw))
    # u[K(6i + j) + k, c] = (G g[k, c] G^T)[i, j]
    u = g.op("Reshape", g.const(kernel, "conv_w"), shape(c_out * c_in, 3, 3))
    u = g.op("MatMul", g.op("MatMul", g.const(G, "winograd_g"), u), g.const(G.T, "winograd_gt"))
    u = g.op("Transpose", g.op("Reshape", u, shape(c_out, c_in, t)), perm=[2, 0, 1])
    u = g.op("Reshape", u, shape(t * c_out, c_in, 1, 1))
    prod = g.op("Conv", v, u, kernel_shape=[1, 1], group=t)
    # y[n, k, 4p + r, 4q + s] = sum_{i, j} AT[r, i] prod[n, K(6i + j) + k, p, q] AT[s, j]
    y = g.op("MatMul", g.const(output_matrix(), "winograd_at"),
             g.op("Reshape", prod, shape(0, t, c_out * th * tw)))  # fmt: skip
    y = g.op("DepthToSpace", g.op("Reshape", y, shape(0, m * m * c_out, th, tw)), blocksize=m,
             mode="DCR")  # fmt: skip
    return g.op("Add", y, g.const(bias.reshape(c_out, 1, 1), "conv_b"))

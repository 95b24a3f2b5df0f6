"""Winograd F(4x4, 3x3): a 3x3 convolution computed on 6x6 input tiles taken every 4 pixels.

Y = A^T [(G g G^T) * (B^T d B)] A for a tile d and a kernel g (Lavin and Gray, 2016), with the
interpolation points 0, +-1, +-2 and infinity. It costs 36 multiplications per 4x4 block of
outputs and pair of channels instead of 144. onnxruntime's CPU convolutions compute directly,
so `onnx_export.Graph.winograd_conv` writes these transforms into the ONNX graph.
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

# Where it pays on onnxruntime's CPU kernels (`bench_winograd.py`, one layer at each size, in
# docs/latency.md): the transforms are memory passes, so only wide layers with many tiles gain.
# At C_in >= 128 and C_in * C_out * H * W >= 2^26 per frame it took 0.56-0.90 of the direct
# convolution's time; on 64 channels or on 8x8 maps, 1.3-1.6x.
MIN_CHANNELS = 128
MIN_MACS = 2**26


def pays(c_in: int, c_out: int, hw) -> bool:
    """Whether a 3x3, stride-1, SAME convolution of this size is written as Winograd."""
    h, w = hw
    return (h % OUT == 0 and w % OUT == 0 and c_in >= MIN_CHANNELS
            and c_in * c_out * h * w >= MIN_MACS)  # fmt: skip


def input_filters() -> np.ndarray:
    """(36, 1, 6, 6): filter 6i + j gives (B^T d B)[i, j] of a 6x6 tile d."""
    return np.einsum("iy,jx->ijyx", BT, BT).reshape(TILE * TILE, 1, TILE, TILE)


def output_matrix() -> np.ndarray:
    """(16, 36): row 4r + s gives (A^T m A)[r, s] from the 36 products m[6i + j]."""
    return np.einsum("ri,sj->rsij", AT, AT).reshape(OUT * OUT, TILE * TILE)

r"""What stops jax2onnx from exporting the TAVR engine, each case in a few lines of plain JAX/Flax.

jax2onnx pins orbax-checkpoint below ours, so run this in a venv of its own:

    python3 -m venv /tmp/j2o && /tmp/j2o/bin/pip install jax2onnx==0.17.1 onnxruntime \
        "jax==$(.venv/bin/python -c 'import jax; print(jax.__version__)')" flax
    JAX_PLATFORMS=cpu /tmp/j2o/bin/python experiments/jax2onnx_blockers.py

Each case names the line of our code that does the same thing; docs/architecture.md ("One
network definition for export") has the findings, the measured speed of what did export, and
why the hand-built graph stays.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from jax2onnx import to_onnx  # noqa: E402


class _Head(nn.Module):  # tavr_jax/models/heads.py PointHead
    @nn.compact
    def __call__(self, h):
        return nn.Dense(4)(nn.relu(nn.Dense(6)(h)))


def _cases():
    heads = nn.vmap(_Head, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=None, out_axes=1, axis_size=3)()  # fmt: skip
    head_vars = heads.init(jax.random.key(0), jnp.zeros((1, 5)))
    nhwc = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    symbolic = jax.ShapeDtypeStruct(jax.export.symbolic_shape("B, 16, 16, 8"), jnp.float32)
    window = ((0, 0), (1, 1), (1, 1), (0, 0))
    return {
        # cardiac_core/backbones.py: nn.max_pool(x, (3, 3), strides=(2, 2), padding=...)
        "A flax max_pool, positional window and explicit padding": (
            lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
            nhwc,
        ),
        # tavr_jax/models/heads.py: nn.vmap(PointHead) over the groups
        "B nn.vmap over nn.Dense": (
            lambda h: heads.apply(head_vars, h),
            jax.ShapeDtypeStruct((1, 5), jnp.float32),
        ),
        # tavr_jax/infer/engine.py: the frame resized to the network input, antialiased
        "C jax.image.resize, linear, antialias=True (downscale)": (
            lambda x: jax.image.resize(x, (1, 32, 32), "linear", antialias=True),
            jax.ShapeDtypeStruct((1, 64, 64), jnp.float32),
        ),
        # tavr_jax/models/dense.py and heads.py: upsampling (antialias defaults to True)
        "C' jax.image.resize, bilinear upsample": (
            lambda x: jax.image.resize(x, (1, 32, 32, 8), "bilinear"),
            nhwc,
        ),
        # what the max pool becomes in a jaxpr: a reduce_window over NHWC
        "D lax.reduce_window max (1,3,3,1) on NHWC": (
            lambda x: jax.lax.reduce_window(
                x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), window
            ),  # fmt: skip
            nhwc,
        ),
        # tavr_jax/models/dense.py with a symbolic batch
        "F jax.image.resize with a symbolic batch": (
            lambda x: jax.image.resize(x, (x.shape[0], 32, 32, 8), "bilinear", antialias=False),
            symbolic,
        ),
    }


def main():
    for name, (fn, spec) in _cases().items():
        try:
            proto = to_onnx(fn, [spec])
        except Exception as e:
            print(f"{name}: export fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        try:
            session = ort.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])  # fmt: skip
            shape = [d if isinstance(d, int) else 2 for d in spec.shape]
            session.run(None, {session.get_inputs()[0].name: np.ones(shape, np.float32)})
            print(f"{name}: exports and runs in onnxruntime")
        except Exception as e:
            print(f"{name}: exports, onnxruntime fails: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()

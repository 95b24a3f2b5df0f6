"""ONNX export of the whole keypoint engine (the one module that imports onnx, lazily).

The rest of the project runs without onnx; `onnx_runtime` runs the graphs written here. The
graph is written from the trained parameters with `onnx.helper`, layer by layer in the order
the Flax modules apply them, so every operation is one we chose:

- uint8 frames (B, H, W) in; the antialiased linear resize to the network input as two
  MatMuls with the exact resampling matrices of `jax.image.resize` (ONNX's Resize has no
  antialiasing before opset 18, and its kernel support differs); the normalisation;
- the backbone in NCHW with every batch norm folded into its convolution; the wide 3x3
  convolutions as Winograd F(4x4, 3x3) where a rule picks them (fixed, or measured on this
  machine: `winograd_measure`);
- the head; sigmoids; coordinates scaled to frame pixels; the same outputs as
  `KeypointEngine`: visibility (B, K), group (B, G), coords (B, K, 2).

Backbones: the ResNet and VGG families. Heads: regression, integral and heatmap, grouped or
not. Any other backbone or head is refused with a one-line error naming it.

Its metadata (key `tavr_keypoints`, JSON) records the format, opset, inputs and outputs, schema,
thresholds, frame size, config hash (`engine.check_artifact` refuses another schema's or run's),
and key `integrity` the file's role and sha256 (`save_model`; `load_onnx` refuses an edit).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from cardiac_core import integrity
from tavr_jax.infer import winograd
from tavr_jax.run.workdir import config_hash
from tavr_jax.schema import KeypointSchema

OPSET = 17  # the first opset with LayerNormalization
FORMAT = "tavr-keypoints-onnx/1"
METADATA_KEY = "tavr_keypoints"
INPUT_NAME = "frames"
OUTPUT_NAMES = ("visibility", "group", "coords")
SUPPORTED_HEADS = ("regression", "integral", "heatmap")


def library_versions() -> dict:
    """Versions of what made (and what runs) an artifact: to record beside it."""
    import importlib.metadata

    versions = {}
    for dist in ("cardiac-jax", "jax", "jaxlib", "flax", "numpy", "onnx", "onnxruntime",
                 "openvino", "nncf"):  # fmt: skip
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ValueError(
            "ONNX export needs the onnx package: pip install 'cardiac-jax[onnx]'"
        ) from None
    return onnx


# -- the graph ----------------------------------------------------------------------------------


class Graph:
    """Nodes and float32 initializers of one ONNX graph; `op` returns its output's name.

    winograd: which 3x3 stride-1 convolutions on whole tiles are written as Winograd
    F(4x4, 3x3): a rule (c_in, c_out, (h, w)) -> bool with `metadata()`, such as
    `winograd.FIXED` (True) or a `winograd_measure.MeasuredRule`; False: none.
    `winograd_convolutions` counts them.
    """

    def __init__(self, *, winograd=True):
        self.onnx = _import_onnx()
        self.nodes, self.initializers = [], []
        self._n = 0
        self.winograd_rule = _rule(winograd)
        self.winograd_convolutions = 0

    def winograd_metadata(self) -> dict:
        """What the file records about its Winograd convolutions: the rule and the count."""
        rule = self.winograd_rule
        info = winograd.OFF_METADATA if rule is None else rule.metadata()
        return {**info, "winograd_convolutions": self.winograd_convolutions}

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint: str = "c") -> str:
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        name = self._name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs) -> str:
        out = name or self._name(op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def dense(self, x: str, p: dict) -> str:
        """Flax Dense: x @ kernel + bias."""
        return self.op("Add", self.op("MatMul", x, self.const(p["kernel"], "kernel")),
                       self.const(p["bias"], "bias"))  # fmt: skip

    def conv(self, x: str, p: dict, *, stride=1, pad=0, bn: dict | None = None, eps=1e-5,
             hw=None) -> str:  # fmt: skip
        """Flax Conv (HWIO kernel, optional bias), then an optional inference batch norm,
        as one ONNX Conv: the norm's scale goes into the kernel and its shift into the bias.

        hw: the input's spatial size, where known: a 3x3 stride-1 SAME convolution is then
        written as Winograd where that pays.
        """
        kernel = np.asarray(p["kernel"], np.float64).transpose(3, 2, 0, 1)  # HWIO -> OIHW
        bias = np.asarray(p.get("bias", np.zeros(kernel.shape[0])), np.float64)
        if bn is not None:
            scale = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(bn["var"]) + eps)
            kernel = kernel * scale[:, None, None, None]
            bias = (bias - np.asarray(bn["mean"])) * scale + np.asarray(bn["bias"])
        c_out, c_in = kernel.shape[:2]
        if (self.winograd_rule is not None and hw is not None and kernel.shape[2:] == (3, 3)
                and stride == 1 and pad == 1 and winograd.whole_tiles(hw)
                and self.winograd_rule(c_in, c_out, hw)):  # fmt: skip
            return self.winograd_conv(x, kernel, bias, hw)
        return self.op(
            "Conv", x, self.const(kernel, "conv_w"), self.const(bias, "conv_b"),
            kernel_shape=list(kernel.shape[2:]), strides=[stride, stride], pads=[pad] * 4,
        )  # fmt: skip

    def winograd_conv(self, x: str, kernel: np.ndarray, bias: np.ndarray, hw) -> str:
        """A 3x3, stride-1, SAME convolution (OIHW kernel) on whole 4x4 tiles as Winograd
        F(4x4, 3x3) (`winograd.write_conv`), counted."""
        self.winograd_convolutions += 1
        return winograd.write_conv(self, x, kernel, bias, hw)

    def model(self, name: str, inputs: list, outputs: list, doc_string: str = ""):
        """The graph as a ModelProto; inputs and outputs are `onnx.helper` value infos."""
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="cardiac-jax", doc_string=doc_string)  # fmt: skip
        model.ir_version = 8  # the IR of opset 17: older runtimes read the file too
        return model

    def matmul_left(self, matrix: np.ndarray, x: str) -> str:
        return self.op("MatMul", self.const(matrix, "resample"), x)


def resize_matrix(n_in: int, n_out: int, *, antialias: bool = True) -> np.ndarray:
    """(n_out, n_in) float32: the linear map of `jax.image.resize(..., "linear")` along one axis.

    The resize is linear and separable, so resizing the identity gives its exact weights.
    """
    import jax
    import jax.numpy as jnp

    eye = jnp.eye(n_in, dtype=jnp.float32)
    return np.asarray(jax.image.resize(eye, (n_out, n_in), "linear", antialias=antialias))


def _resize_hw(g: Graph, x: str, in_hw, out_hw, *, antialias=True) -> str:
    """Resizes the last two axes of x by rows (left MatMul) then columns (right MatMul)."""
    (h, w), (oh, ow) = in_hw, out_hw
    if oh != h:
        x = g.matmul_left(resize_matrix(h, oh, antialias=antialias), x)
    if ow != w:
        x = g.op("MatMul", x, g.const(resize_matrix(w, ow, antialias=antialias).T, "resample"))
    return x


def _backbone_spec(name: str):
    """(kind, keywords) of a backbone preset: 'resnet' or 'vgg'; else a one-line error."""
    from cardiac_core.backbones import BACKBONES, VGG, ResNet

    factory = BACKBONES.get(name)
    kind = {ResNet: "resnet", VGG: "vgg"}.get(getattr(factory, "func", None))
    if kind is None:
        supported = ", ".join(n for n, f in BACKBONES.items() if getattr(f, "func", None) in
                              (ResNet, VGG))  # fmt: skip
        raise ValueError(f"backbone {name!r} has no ONNX export (supported: {supported})")
    return kind, factory.keywords


def _resnet(g: Graph, x: str, params: dict, stats: dict, keywords: dict, image_hw) -> list[str]:
    from cardiac_core.backbones import Bottleneck

    def conv_bn(x, block_p, block_s, conv, bn, *, stride=1, pad=0, hw=None):
        return g.conv(x, block_p[conv], stride=stride, pad=pad,
                      bn={**block_p[bn], **block_s[bn]}, hw=hw)  # fmt: skip

    x = g.op("Relu", conv_bn(x, params, stats, "conv1", "bn1", stride=2, pad=3))
    x = g.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    bottleneck = keywords["block_cls"] is Bottleneck
    stages = []
    stage_hw = _stage_hw(image_hw, "resnet", keywords)
    for i, n_blocks in enumerate(keywords["stage_sizes"]):
        for j in range(n_blocks):
            name = f"layer{i + 1}_{j}"
            p, s = params[name], stats[name]
            stride = 2 if i > 0 and j == 0 else 1
            hw = stage_hw[i] if stride == 1 else None  # a stride-1 3x3 keeps the stage's size
            if bottleneck:  # stride on the 3x3 convolution, as torchvision
                y = g.op("Relu", conv_bn(x, p, s, "conv1", "bn1"))
                y = g.op("Relu", conv_bn(y, p, s, "conv2", "bn2", stride=stride, pad=1, hw=hw))
                y = conv_bn(y, p, s, "conv3", "bn3")
            else:
                y = g.op("Relu", conv_bn(x, p, s, "conv1", "bn1", stride=stride, pad=1, hw=hw))
                y = conv_bn(y, p, s, "conv2", "bn2", pad=1, hw=stage_hw[i])
            residual = x
            if "downsample_0" in p:
                residual = conv_bn(x, p, s, "downsample_0", "downsample_1", stride=stride)
            x = g.op("Relu", g.op("Add", residual, y))
        stages.append(x)  # strides 4, 8, 16, 32
    return stages


def _vgg(g: Graph, x: str, params: dict, stats: dict, keywords: dict, image_hw) -> list[str]:
    idx, stages, hw = 0, [], tuple(image_hw)
    for v in keywords["cfg"]:
        if v == "M":
            x = g.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2])
            hw = (hw[0] // 2, hw[1] // 2)
            stages.append(x)  # strides 2, 4, ..., 32, as `VGG(return_stages=True)` minus the first
            idx += 1
            continue
        bn = None
        if keywords.get("batch_norm"):
            bn = {**params[f"features_{idx + 1}"], **stats[f"features_{idx + 1}"]}
        x = g.op("Relu", g.conv(x, params[f"features_{idx}"], pad=1, bn=bn, hw=hw))
        idx += 3 if bn is not None else 2
    return stages[1:]


def _point_outputs(g: Graph, h: str, p: dict, schema: KeypointSchema, per_point: int) -> str:
    """`PointOutputs`: (B, D) shared features -> (B, K, per_point)."""
    from tavr_jax.models.heads import padded_to_points

    if "point_head" in p:
        out = g.dense(g.op("Relu", g.dense(h, p["point_head"]["hidden"])), p["point_head"]["out"])
        return g.op("Reshape", out, g.const(np.array([0, schema.num_points, per_point])))
    hidden, out = p["group_heads"]["hidden"], p["group_heads"]["out"]
    n_groups, _, width = hidden["kernel"].shape
    # The vmapped group heads as one wide hidden layer and one block-diagonal output layer:
    # the zeros add nothing, so each group's numbers are exactly its own head's.
    w_hidden = np.concatenate(list(np.asarray(hidden["kernel"])), axis=1)  # (D, G * width)
    n_out = out["kernel"].shape[-1]
    w_out = np.zeros((n_groups * width, n_groups * n_out), np.float32)
    for i in range(n_groups):
        w_out[i * width : (i + 1) * width, i * n_out : (i + 1) * n_out] = out["kernel"][i]
    y = g.dense(h, {"kernel": w_hidden, "bias": np.ravel(hidden["bias"])})
    y = g.dense(g.op("Relu", y), {"kernel": w_out, "bias": np.ravel(out["bias"])})
    y = g.op("Reshape", y, g.const(np.array([0, n_groups * schema.max_group_size, per_point])))
    return g.op("Gather", y, g.const(padded_to_points(schema).astype(np.int64)), axis=1)


def _last(g: Graph, x: str, start: int, stop: int) -> str:
    """x[..., start:stop]."""
    return g.op("Slice", x, g.const(np.array([start])), g.const(np.array([stop])),
                g.const(np.array([-1])))  # fmt: skip


def _soft_argmax(g: Graph, heatmaps: str, hh: int, ww: int, k: int) -> str:
    """(B, K, hh, ww) logits -> (B, K, 2) expected (x, y) of cell centres in [0, 1]."""
    probs = g.op("Softmax", g.op("Reshape", heatmaps, g.const(np.array([0, k, hh * ww]))), axis=-1)
    xs = (np.arange(ww) + 0.5) / ww
    ys = (np.arange(hh) + 0.5) / hh
    grid = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]), -1).reshape(hh * ww, 2)
    return g.op("MatMul", probs, g.const(grid, "grid"))


def _local_soft_argmax(g: Graph, heatmaps: str, hh: int, ww: int, k: int, radius: int) -> str:
    """`models.dense.local_soft_argmax`: the soft-argmax over the cells near each map's peak."""
    flat = g.op("Reshape", heatmaps, g.const(np.array([0, k, hh * ww])))
    # The peak's row and column as float32 (exact for these map sizes), (B, K, 1) each.
    peak = g.op("Cast", g.op("ArgMax", flat, axis=-1, keepdims=1), to=g.onnx.TensorProto.FLOAT)
    row = g.op("Floor", g.op("Div", peak, g.const(np.float32(ww))))
    col = g.op("Sub", peak, g.op("Mul", row, g.const(np.float32(ww))))

    def near(centre, n):  # (B, K, n): |index - centre| <= radius
        offset = g.op("Abs", g.op("Sub", g.const(np.arange(n, dtype=np.float32)), centre))
        return g.op("LessOrEqual", offset, g.const(np.float32(radius)))

    rows = g.op("Unsqueeze", near(row, hh), g.const(np.array([-1])))  # (B, K, h, 1)
    cols = g.op("Unsqueeze", near(col, ww), g.const(np.array([-2])))  # (B, K, 1, w)
    masked = g.op("Where", g.op("And", rows, cols), heatmaps, g.const(np.float32(-np.inf)))
    return _soft_argmax(g, masked, hh, ww, k)


def _with_evidence(g: Graph, vis_logits: str, heatmaps: str, cells: int, meta: dict) -> str:
    """`heads.heatmap_evidence` added to the visibility logits when the model has it."""
    if not meta.get("dense_visibility", False):
        return vis_logits
    lse = g.op("ReduceLogSumExp", heatmaps, axes=[2, 3], keepdims=0)  # (B, K)
    evidence = g.op("Sub", lse, g.const(np.float32(np.log(cells))))
    return g.op("Add", vis_logits, evidence)


def _neck(g: Graph, stages: list[str], stage_hw: list, p: dict) -> tuple[str, tuple]:
    """`models.dense.FeaturePyramidNeck` over as many of the last stages as it has laterals:
    (its output map, that map's (h, w))."""
    levels = sum(name.startswith("lateral_") for name in p)
    stages, stage_hw = stages[-levels:], stage_hw[-levels:]
    x = g.conv(stages[-1], p[f"lateral_{levels - 1}"])
    for i in range(levels - 2, -1, -1):
        x = _resize_hw(g, x, stage_hw[i + 1], stage_hw[i])
        x = g.op("Add", x, g.conv(stages[i], p[f"lateral_{i}"]))
        x = g.op("Relu", g.conv(x, p[f"smooth_{i}"], pad=1))
    return x, stage_hw[0]


def _head(g, stages, stage_hw, params, meta, schema) -> tuple[str, str, str]:
    """The head: the backbone's stages ((B, C, h, w) each, fine to coarse) -> (group logits,
    visibility logits, coords in [0, 1])."""
    kind = meta.get("head", "regression")
    features, feat_hw = stages[-1], stage_hw[-1]
    pooled = g.op("ReduceMean", features, axes=[2, 3], keepdims=0)
    shared = params["shared"]
    h = g.dense(pooled, shared["dense"])
    h = g.op("LayerNormalization", h, g.const(shared["norm"]["scale"]),
             g.const(shared["norm"]["bias"]), axis=-1, epsilon=1e-5)  # fmt: skip
    h = g.op("Relu", h)
    k = schema.num_points
    if kind == "regression":
        out = _point_outputs(g, h, params["points"], schema, 3)  # (B, K, 3)
        vis_logits = g.op("Reshape", _last(g, out, 0, 1), g.const(np.array([0, k])))
        coords = g.op("Sigmoid", _last(g, out, 1, 3))
    elif kind == "heatmap":
        out = _point_outputs(g, h, params["points"], schema, 1)
        vis_logits = g.op("Reshape", out, g.const(np.array([0, k])))
        x, (hh, ww) = _neck(g, stages, stage_hw, params["neck"])
        heatmaps = g.conv(x, params["heatmap_out"])
        coords = _local_soft_argmax(g, heatmaps, hh, ww, k, _head_default("heatmap", "radius"))
        vis_logits = _with_evidence(g, vis_logits, heatmaps, hh * ww, meta)
    else:
        out = _point_outputs(g, h, params["points"], schema, 1)
        vis_logits = g.op("Reshape", out, g.const(np.array([0, k])))
        x = g.op("Relu", g.conv(features, params["heatmap_conv"], pad=1))
        hh, ww = feat_hw
        up = _head_default("integral", "upsample")
        x = _resize_hw(g, x, (hh, ww), (hh * up, ww * up), antialias=True)
        heatmaps = g.conv(x, params["heatmap_out"])
        coords = _soft_argmax(g, heatmaps, hh * up, ww * up, k)
        vis_logits = _with_evidence(g, vis_logits, heatmaps, hh * up * ww * up, meta)
    if "group_classifier" in params:
        group_logits = g.dense(h, params["group_classifier"])
    else:  # ungrouped: a group's logit is the largest of its points' logits
        member = schema.group_matrix > 0  # (G, K)
        mask = np.where(member, 0.0, -np.inf)[None]  # (1, G, K)
        scores = g.op("Add", g.op("Unsqueeze", vis_logits, g.const(np.array([1]))), g.const(mask))
        group_logits = g.op("ReduceMax", scores, axes=[2], keepdims=0)
    return group_logits, vis_logits, coords


def check_supported(meta: dict) -> tuple[str, dict]:
    """One-line ValueError naming a backbone or head this exporter cannot write."""
    if meta.get("refiner"):
        raise ValueError(
            "the ONNX graph has no second stage: build the engine without the refiner "
            "(no --refine) to export it or to run it on onnxruntime"
        )
    kind = meta.get("head", "regression")
    if kind not in SUPPORTED_HEADS:
        raise ValueError(
            f"head {kind!r} has no ONNX export (supported: {', '.join(SUPPORTED_HEADS)})"
        )
    return _backbone_spec(meta["backbone"])


def _head_default(head: str, field: str):
    """A head's architecture constant (the exporter writes the network the defaults build)."""
    import dataclasses

    from tavr_jax.models.heads import HEADS

    return next(f.default for f in dataclasses.fields(HEADS[head]) if f.name == field)


def _stage_hw(image_hw, kind: str, keywords: dict) -> list[tuple[int, int]]:
    """Spatial sizes of the stages `_resnet` / `_vgg` return, for an input size."""

    def out(n, k, s, p):
        return (n + 2 * p - k) // s + 1

    h, w = image_hw
    sizes = []
    if kind == "resnet":
        h, w = (out(out(n, 7, 2, 3), 3, 2, 1) for n in (h, w))
        sizes.append((h, w))
        for _ in keywords["stage_sizes"][1:]:
            h, w = out(h, 3, 2, 1), out(w, 3, 2, 1)
            sizes.append((h, w))
        return sizes
    for v in keywords["cfg"]:
        if v == "M":
            h, w = h // 2, w // 2
            sizes.append((h, w))
    return sizes[1:]


def engine_graph(meta: dict, variables, *, frame_size, batch: int | None = None,
                winograd=True, extra_metadata: dict | None = None):  # fmt: skip
    """The engine function (uint8 frames -> visibility, group, coords) as an onnx.ModelProto.

    meta: the engine's meta (`schema`, `backbone`, `head`, `grouped`, `image_size`);
    variables: `{"params", "batch_stats"}` of the network (float32); frame_size: (H, W) of
    the frames the graph takes; batch: a fixed batch size, or None for a symbolic one;
    winograd: the rule for the 3x3 convolutions written as Winograd F(4x4, 3x3) (`Graph`;
    True: `winograd.FIXED`, False: none). The metadata records the rule (`winograd_rule`, and
    a measured rule's per-shape timings) and counts them (`winograd_convolutions`).
    """
    onnx = _import_onnx()
    from tavr_jax.models.keypoint_net import GRAY_MEAN, GRAY_STD

    schema = meta["schema"]
    kind, keywords = check_supported(meta)
    fh, fw = (int(v) for v in frame_size)
    sh, sw = _pair(meta["image_size"])
    params = _numpy_tree(variables["params"])
    stats = _numpy_tree(variables.get("batch_stats", {}))
    g = Graph(winograd=winograd)
    x = g.op("Cast", INPUT_NAME, to=onnx.TensorProto.FLOAT)
    x = _resize_hw(g, x, (fh, fw), (sh, sw))
    # (x / 255 - mean) / std as one multiply-add.
    x = g.op("Add", g.op("Mul", x, g.const(np.float32(1 / (255 * GRAY_STD)))),
             g.const(np.float32(-GRAY_MEAN / GRAY_STD)))  # fmt: skip
    x = g.op("Unsqueeze", x, g.const(np.array([1])))  # (B, 1, S, S)
    build_backbone = {"resnet": _resnet, "vgg": _vgg}[kind]
    stages = build_backbone(g, x, params["backbone"], stats.get("backbone", {}), keywords,
                            (sh, sw))  # fmt: skip
    group_logits, vis_logits, coords = _head(
        g, stages, _stage_hw((sh, sw), kind, keywords), params["head"], meta, schema
    )
    g.op("Sigmoid", vis_logits, name="visibility")
    g.op("Sigmoid", group_logits, name="group")
    g.op("Mul", coords, g.const(np.array([fw, fh], np.float32)), name="coords")

    b = "batch" if batch is None else int(batch)
    k, n_groups = schema.num_points, schema.num_groups
    tensor = onnx.helper.make_tensor_value_info
    model = g.model(
        "tavr_keypoints",
        [tensor(INPUT_NAME, onnx.TensorProto.UINT8, [b, fh, fw])],
        [
            tensor("visibility", onnx.TensorProto.FLOAT, [b, k]),
            tensor("group", onnx.TensorProto.FLOAT, [b, n_groups]),
            tensor("coords", onnx.TensorProto.FLOAT, [b, k, 2]),
        ],  # fmt: skip
        doc_string="uint8 frames (B, H, W) -> visibility (B, K), group (B, G), coords (B, K, 2)",
    )
    info = artifact_meta(meta, frame_size=(fh, fw), batch=batch, opset=OPSET)
    info.update(g.winograd_metadata())
    info.update(extra_metadata or {})
    return set_metadata(model, info)


def artifact_meta(meta: dict, *, frame_size, batch, opset: int | None = None) -> dict:
    """What an exported artifact records about itself (ONNX metadata / jax.export header)."""
    schema = meta["schema"]
    config = meta.get("config")
    b = "batch" if batch is None else int(batch)
    fh, fw = (int(v) for v in frame_size)
    info = {
        "format": FORMAT,
        "schema": schema.to_json(),
        "backbone": meta.get("backbone"),
        "head": meta.get("head", "regression"),
        "grouped": bool(meta.get("grouped", True)),
        "dense_visibility": bool(meta.get("dense_visibility", False)),
        "image_size": list(_pair(meta["image_size"])),
        "frame_size": [fh, fw],
        "batch": batch,
        "dtype": "float32",
        "thresholds": _list_or_none(meta.get("thresholds")),
        "group_thresholds": _list_or_none(meta.get("group_thresholds")),
        "config_hash": config_hash(config) if config is not None else meta.get("config_hash"),
        "inputs": {INPUT_NAME: {"dtype": "uint8", "shape": [b, fh, fw]}},
        "outputs": {
            "visibility": {"dtype": "float32", "shape": [b, schema.num_points]},
            "group": {"dtype": "float32", "shape": [b, schema.num_groups]},
            "coords": {
                "dtype": "float32",
                "shape": [b, schema.num_points, 2],
                "unit": "frame pixels (x, y), half-pixel centres",
            },
        },
    }
    if opset is not None:
        info["opset"] = opset
    return info


def engine_model(engine, *, frame_size, batch: int | None = None, winograd=True):
    """A float32 `KeypointEngine`'s whole function as an ONNX ModelProto (`engine_graph`)."""
    if engine.dtype_name != "float32":
        raise ValueError(
            f"ONNX export is float32 only; this engine computes in {engine.dtype_name}"
        )
    import jax

    variables = jax.device_get(engine.variables)
    meta = {**engine.meta, "schema": engine.schema, "image_size": engine.image_size}
    return engine_graph(meta, variables, frame_size=frame_size, batch=batch, winograd=winograd,
                       extra_metadata={"versions": library_versions()})  # fmt: skip


def save_model(model, path) -> pathlib.Path:
    """A ModelProto (`engine_model`, or quantised) as one ONNX file, atomically, sealed."""
    return integrity.write_onnx(path, model.SerializeToString(), role=METADATA_KEY, version=1)


def read_metadata(path) -> dict:
    """The `tavr_keypoints` metadata of an ONNX file written by `save_model`."""
    onnx = _import_onnx()
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError
        raise ValueError(f"{path} is not an ONNX model ({type(e).__name__})") from None
    return parse_metadata({p.key: p.value for p in model.metadata_props}, path)


def read_model(path):
    """An ONNX file as a ModelProto."""
    return _import_onnx().load(str(path))


def set_metadata(model, info: dict):
    """`model` with its `tavr_keypoints` metadata replaced by `info` (other properties kept)."""
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps(info)
    del model.metadata_props[:]
    _import_onnx().helper.set_model_props(model, props)
    return model


def parse_metadata(props: dict, path) -> dict:
    """The keypoint-engine metadata among an ONNX file's metadata properties."""
    if METADATA_KEY not in props:
        raise ValueError(f"{path} is an ONNX model but not an exported keypoint engine")
    return json.loads(props[METADATA_KEY])


def _rule(choice):
    """A Graph's Winograd rule from its `winograd` argument: True is the fixed rule."""
    return winograd.FIXED if choice is True else choice or None


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _numpy_tree(tree) -> dict:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def _list_or_none(x):
    # Thresholds as exact Python floats: the gate compares against the same numbers.
    return None if x is None else np.asarray(x).astype(np.float64).tolist()

r"""Training throughput (images/s) and model FLOP utilisation per backbone and dtype.

    python experiments/bench_train.py --backbones=resnet18,resnet34 --image_size=512 \
        --batch_size=64 --dtypes=float32,bfloat16 [--data=DIR] --out=bench_train.json
    python experiments/bench_train.py --backbones=resnet34 --image_size=512 \
        --variants=bfloat16:64,float32:64,bfloat16:128,bfloat16:64:bf16_state,bfloat16:64:noaug \
        --pipeline_rows=1 --data=DIR --out=bench_train.json

FLOPs per step are the model's (convolutions and products counted from the jaxpr,
`cardiac_core.xla.model_flops`: XLA's compiled analysis leaves out cuDNN's convolutions on a
GPU); MFU = achieved FLOP/s over the device's peak (--peak_tflops, or a table of known GPUs).
With --data the step is also fed by the real input pipeline (a Supervisely project or TFDS
folder). The JSON is rewritten after every row; weights are initialised once per backbone.
`--variants` replaces the dtypes by rows of DTYPE:BATCH[:noaug][:bf16_state] (augmentation
off; parameters, batch statistics and optimizer moments in bf16), in the order given; every
rate is taken after the step is compiled (`compile_s` apart), and a row that fails is kept
with its error.
"""

import datetime
import pathlib

import jax
from absl import app, flags
from ml_collections import config_flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from experiments.benchmarks import training

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "tavr.py"), "base training config"
)
_BACKBONES = flags.DEFINE_list("backbones", ["resnet18", "resnet34"], "backbones to measure")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes")
_SIZE = flags.DEFINE_integer("image_size", 512, "network input size")
_BATCH = flags.DEFINE_integer("batch_size", 64, "global batch size")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per repeat")
_REPEATS = flags.DEFINE_integer("repeats", 3, "repeats (the median is reported)")
_DATA = flags.DEFINE_string("data", None, "optional dataset for the real-pipeline figure")
_PEAK = flags.DEFINE_float("peak_tflops", None, "device peak TFLOP/s per dtype (default: table)")
_OUT = flags.DEFINE_string("out", "bench_train.json", "JSON output")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "rows DTYPE:BATCH[:noaug][:bf16_state] instead of --dtypes x --batch_size"
)
_PIPELINE_ROWS = flags.DEFINE_integer(
    "pipeline_rows", None, "with --data: the real-pipeline rate of the first N rows only"
)

# Dense peak TFLOP/s per device (fp32 matmuls run as TF32 on these GPUs by default).
_PEAKS = {
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def _peak(device_kind: str, dtype: str) -> float | None:
    if _PEAK.value is not None:
        return _PEAK.value
    return next((p[dtype] for name, p in _PEAKS.items() if name in device_kind), None)


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _row(r: dict) -> str:
    gflop_per_image = r["flops_per_step"] / r["batch_size"] / 1e9 if r["flops_per_step"] else None
    return (
        f"{r['backbone']:>16} {r['dtype']:>9} | {_fmt(r['images_per_s'], '9.1f')} img/s "
        f"| pipeline {_fmt(r['images_per_s_pipeline'], '9.1f')} img/s "
        f"| {_fmt(gflop_per_image, '7.2f')} GFLOP/img | {_fmt(r['tflops_per_s'], '7.3f')} TFLOP/s "
        f"| MFU {_fmt(r['mfu'], '.1%')} | batch {r['batch_size']}, state {r['state_dtype']}, "
        f"augmentation {'on' if r['augment'] else 'off'}, "
        f"compiled in {_fmt(r['compile_s'], '.1f')} s"
    )


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    variants = [training.parse_variant(v) for v in _VARIANTS.value] or [
        {"dtype": d, "batch_size": _BATCH.value, "augment": None, "state_dtype": "float32"}
        for d in _DTYPES.value
    ]  # fmt: skip
    rows = []
    for backbone in _BACKBONES.value:
        state = None  # the same fp32 weights serve every row of a backbone
        for i, v in enumerate(variants):
            config = _CONFIG.value.copy_and_resolve_references()
            config.update(backbone=backbone, dtype=v["dtype"], image_size=_SIZE.value,
                          batch_size=v["batch_size"])  # fmt: skip
            if v["augment"] is False:
                config.augment = None
            with_pipeline = _PIPELINE_ROWS.value is None or i < _PIPELINE_ROWS.value
            try:
                r, new_state = training.training_rate(
                    config, steps=_STEPS.value, repeats=_REPEATS.value,
                    data_dir=_DATA.value if with_pipeline else None, state=state,
                    state_dtype=v["state_dtype"],
                )  # fmt: skip
            except Exception as e:  # e.g. out of memory at the largest batch: a row, not a stop
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                r.update(images_per_s=None, images_per_s_pipeline=None, flops_per_step=None,
                         tflops_per_s=None, compile_s=None, state_dtype=v["state_dtype"],
                         augment=config.augment is not None)  # fmt: skip
                new_state = None
                print(f"{backbone} {v}: {r['error']}", flush=True)
            if v["state_dtype"] == "float32" and new_state is not None:
                state = new_state  # the input state was donated to the timed steps
            elif state is not None and any(x.is_deleted() for x in jax.tree.leaves(state)):
                state = None
            peak = _peak(jax.devices()[0].device_kind, v["dtype"])
            achieved = r["tflops_per_s"]
            r.update(
                backbone=backbone,
                dtype=v["dtype"],
                image_size=_SIZE.value,
                batch_size=v["batch_size"],
                peak_tflops=peak,
                mfu=achieved / (peak * jax.device_count()) if peak and achieved else None,
            )
            rows.append(r)
            if "error" not in r:
                print(_row(r), flush=True)
            write_json_atomic(
                _OUT.value,
                {"date": datetime.date.today().isoformat(), "device": device, "results": rows},
            )
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

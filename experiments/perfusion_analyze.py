"""Analyze perfusion studies: label, 17-segment scores, SSS/SRS/SDS, TPD, territories.

python experiments/perfusion_analyze.py --model_dir=models/perfusion --input=FILE_OR_DIR \
    --out=report.json [--overlay=DIR] [--metrics_out=metrics.json]
"""

import sys

from absl import app, flags

from perfusion import analyze

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "from perfusion_fit.py", required=True)
_INPUT = flags.DEFINE_string("input", None, "image, image folder or study folder", required=True)
_OUT = flags.DEFINE_string("out", None, "report JSON to write", required=True)
_OVERLAY = flags.DEFINE_string("overlay", None, "folder for one overlay PNG per study")
_METRICS = flags.DEFINE_string(
    "metrics_out", None, "with a labelled study folder: write accuracy / F1 / Dice here"
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        report = analyze.analyze_path(
            _MODEL_DIR.value,
            _INPUT.value,
            _OUT.value,
            overlay_dir=_OVERLAY.value,
            metrics_out=_METRICS.value,
            progress=True,
        )
        print(f"wrote {_OUT.value}: {len(report['studies'])} studies")
        if _METRICS.value:
            with open(_METRICS.value) as f:
                print(f.read())
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)

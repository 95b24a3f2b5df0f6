"""Analyze perfusion studies: label, 17-segment scores, SSS/SRS/SDS, TPD, territories.

python experiments/perfusion_analyze.py --model_dir=models/perfusion --input=FILE_OR_DIR \
    --out=report.json [--overlay=DIR] [--metrics_out=metrics.json] [--max_pixels=16000000]

In a folder, unreadable studies are skipped and listed (with the reason) in the report's
"skipped"; the others are written, and the exit status is 1 when anything was skipped.
"""

import sys

from absl import app, flags

from cardiac_core import images
from cardiac_core.logs import quiet_third_party
from perfusion import analyze

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "from perfusion_fit.py", required=True)
_INPUT = flags.DEFINE_string("input", None, "image, image folder or study folder", required=True)
_OUT = flags.DEFINE_string("out", None, "report JSON to write", required=True)
_OVERLAY = flags.DEFINE_string("overlay", None, "folder for one overlay PNG per study")
_METRICS = flags.DEFINE_string(
    "metrics_out", None, "with a labelled study folder: write accuracy / F1 / Dice here"
)
# Polar-map exports are a few megapixels; a larger file is refused before it is decoded.
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 16_000_000, "largest image accepted (pixels)")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        images.set_max_pixels(_MAX_PIXELS.value)
        report = analyze.analyze_path(
            _MODEL_DIR.value,
            _INPUT.value,
            _OUT.value,
            overlay_dir=_OVERLAY.value,
            metrics_out=_METRICS.value,
            progress=True,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {_OUT.value}: {len(report['studies'])} studies")
    if _METRICS.value:
        with open(_METRICS.value) as f:
            print(f.read())
    for s in report["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
    if report["skipped"]:
        sys.exit(
            f"error: skipped {len(report['skipped'])} of "
            f"{len(report['skipped']) + len(report['studies'])} studies (see above)"
        )


if __name__ == "__main__":
    app.run(main)

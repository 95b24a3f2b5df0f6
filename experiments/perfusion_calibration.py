"""Reliability diagrams and abstention curves from perfusion_analyze --metrics_out files.

python experiments/perfusion_calibration.py \
    --metrics=held-out=runs/m_test.json,other-colormap=runs/m_hot.json \
    --out=docs/perfusion_calibration.png
"""

import json
import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from experiments.studies import perfusion_figures

_METRICS = flags.DEFINE_list("metrics", None, "NAME=metrics.json, one per line", required=True)
_OUT = flags.DEFINE_string("out", "calibration.png", "PNG to write")
_TITLE = flags.DEFINE_string("title", "", "figure title")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        metrics = {}
        for item in _METRICS.value:
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--metrics entry {item!r} is not NAME=path")
            with open(path) as f:
                metrics[name] = json.load(f)
        perfusion_figures.plot_calibration(metrics, _OUT.value, title=_TITLE.value)
    except (ValueError, OSError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

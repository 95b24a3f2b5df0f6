r"""Learning curves of variants (heads, losses, sizes) at equal budget on held-out patients.

    python experiments/tavr_curves.py --data=data/train256 --steps=600 --eval_every=100 \
        --variants='{"regression": {"head": "regression"}, "heatmap": {"head": "heatmap"}}' \
        --test=test1024=data/test1024,test512=data/test512 --workdir_root=runs/curves \
        --out=runs/curves/curves.json --plot=docs/accuracy_curves.png
The base config is experiments/configs/tavr.py:runlocal (override with --config and
--config.field=value); each variant changes dotted fields of it and trains in
WORKDIR_ROOT/<name> (a finished variant is reused).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from cardiac_core.logs import quiet_third_party
from experiments.studies import curves

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/tavr.py:runlocal", "base training config"
)
_DATA = flags.DEFINE_string("data", None, "training Supervisely project (its val cases score)")
_VARIANTS = flags.DEFINE_string("variants", None, 'JSON {"name": {"field": value, ...}, ...}')
_TEST = flags.DEFINE_list("test", [], "held-out projects as name=path")
_STEPS = flags.DEFINE_integer("steps", 600, "training steps per variant")
_EVERY = flags.DEFINE_integer("eval_every", 100, "validation (a curve point) every N steps")
_ROOT = flags.DEFINE_string("workdir_root", "runs/curves", "one training workdir per variant")
_OUT = flags.DEFINE_string("out", "runs/curves/curves.json", "results JSON")
_PLOT = flags.DEFINE_string("plot", None, "learning-curve PNG")
_RELIABILITY = flags.DEFINE_string("reliability", None, "reliability-diagram PNG")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DATA.value or not _VARIANTS.value:
        raise app.UsageError("--data and --variants are required")
    try:
        spec = json.loads(_VARIANTS.value)
        variants = [curves.Variant(name, overrides) for name, overrides in spec.items()]
        tests = dict(t.split("=", 1) for t in _TEST.value)
        results = curves.run_curves(
            _CONFIG.value, _DATA.value, variants, workdir_root=_ROOT.value, test_projects=tests,
            steps=_STEPS.value, eval_every=_EVERY.value, out=_OUT.value,
        )  # fmt: skip
        if _PLOT.value:
            width = next(iter(results.values()))["val"]["at_0.5"]["frame_width_px"]
            curves.plot_curves(results, _PLOT.value, frame_width_px=width)
        if _RELIABILITY.value:
            curves.plot_reliability(results, _RELIABILITY.value)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
    for name, r in results.items():
        print(name, json.dumps({"val": r["val"]["at_0.5"], "test": r["test"]}))


if __name__ == "__main__":
    app.run(main)

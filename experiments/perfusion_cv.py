"""Stratified k-fold cross-validation of a perfusion classifier on a study folder.

python experiments/perfusion_cv.py --data=DIR --task=abnormal --model=rf --folds=5 --out=cv.json
"""

import json
import os
import sys
import tempfile

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from perfusion import classifiers, studies

_DATA = flags.DEFINE_string("data", None, "study folder (images/ + labels.csv)", required=True)
_TASK = flags.DEFINE_enum("task", "abnormal", classifiers.TASKS, "classification task")
_MODEL = flags.DEFINE_enum(
    "model", "rf", classifiers.FEATURE_MODELS + classifiers.CNN_MODELS, "model"
)
_FOLDS = flags.DEFINE_integer("folds", 5, "number of stratified folds")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the folds, the models and the bootstrap")
_SIZE = flags.DEFINE_integer("size", 128, "canonical polar-map size")
_COLORMAP = flags.DEFINE_string("colormap", None, "colormap name when images have no colour bar")
_OUT = flags.DEFINE_string("out", "cv.json", "output JSON")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        data = studies.read_study_folder(
            _DATA.value, colormap=_COLORMAP.value, size=_SIZE.value, progress=True
        )
        result = classifiers.run_study_cv(
            data, _TASK.value, _MODEL.value, folds=_FOLDS.value, seed=_SEED.value, progress=True
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    out_dir = os.path.dirname(os.path.abspath(_OUT.value))
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".json") as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, _OUT.value)
    m = result["metrics"]
    print(
        " ".join(
            f"{k}={v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" for k, v in m.items()
        )
    )


if __name__ == "__main__":
    app.run(main)

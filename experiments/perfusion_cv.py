"""Stratified k-fold cross-validation of a perfusion classifier on a study folder.

python experiments/perfusion_cv.py --data=DIR --task=abnormal --model=rf --folds=5 --out=cv.json
python experiments/perfusion_cv.py --data=DIR --model=clinical --out=cv_clinical.json

--model=clinical fits in every fold what perfusion_fit builds, with the settings of its
config (experiments/configs/perfusion.py, `--config=` another file), and scores every task
at once. An unreadable study is listed and skipped; the counts are printed.
"""

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from perfusion import classifiers, clinical_cv, studies

_DATA = flags.DEFINE_string("data", None, "study folder (images/ + labels.csv)", required=True)
_TASK = flags.DEFINE_enum("task", "abnormal", classifiers.TASKS, "task (not for clinical)")
_MODEL = flags.DEFINE_enum(
    "model", "rf", ("clinical", *classifiers.FEATURE_MODELS, *classifiers.CNN_MODELS), "model"
)
_FOLDS = flags.DEFINE_integer("folds", 5, "number of stratified folds")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the folds, the models and the bootstrap")
_SIZE = flags.DEFINE_integer("size", 128, "canonical polar-map size")
_COLORMAP = flags.DEFINE_string("colormap", None, "colormap name when images have no colour bar")
_OUT = flags.DEFINE_string("out", "cv.json", "output JSON")
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "perfusion.py"), "clinical fit"
)


def _clinical(data, masks) -> dict:
    c = _CONFIG.value
    settings = dict(model=c.model, k=c.k, uncertain_band=tuple(c.uncertain_band))
    settings.update(operating_point=c.operating_point, size=_SIZE.value)
    return clinical_cv.cross_validate_clinical(
        data, masks, folds=_FOLDS.value, seed=_SEED.value, progress=True, **settings
    )


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        data, skipped, masks = clinical_cv.read_folder(
            _DATA.value, size=_SIZE.value, colormap=_COLORMAP.value, progress=True
        )
        for s in skipped:
            print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
        counts = {v: sum(s.label == v for s in data) for v in studies.LABELS}
        print(f"read {len(data)} studies, skipped {len(skipped)}: {counts}")
        if _MODEL.value == "clinical":
            result = _clinical(data, masks)
        else:
            result = classifiers.run_study_cv(
                data, _TASK.value, _MODEL.value, folds=_FOLDS.value, seed=_SEED.value, progress=True
            )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    result.update(read=len(data), skipped=skipped)
    write_json_atomic(_OUT.value, result)
    if _MODEL.value == "clinical":
        print("\n".join(clinical_cv.summary_lines(result)))
    else:
        m = result["metrics"]
        ci = {k: v["ci95"] for k, v in m.items()}
        print(
            " ".join(f"{k}={v['value']:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" for k, v in m.items())
        )


if __name__ == "__main__":
    app.run(main)

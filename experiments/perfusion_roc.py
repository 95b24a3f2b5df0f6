"""ROC curves of the perfusion model, with the calls at its operating point marked.

python experiments/perfusion_roc.py --cv=cv_clinical.json --model_dir=models/perf \
    --report=report.json --labels=data/perf_test/labels.csv --out=docs/images/perfusion_roc.png

--cv: the out-of-fold reports of `perfusion_cv --model=clinical` on the training folder;
--report and --labels: a held-out folder analysed by `perfusion_analyze` with the model of
--model_dir, whose out-of-fold choice of threshold (model.json) is starred.
"""

import json
import pathlib
import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from experiments.studies import perfusion_figures
from perfusion import evaluation, studies

_CV = flags.DEFINE_string("cv", None, "JSON of perfusion_cv --model=clinical")
_REPORT = flags.DEFINE_string("report", None, "report JSON of perfusion_analyze (held out)")
_LABELS = flags.DEFINE_string("labels", None, "labels.csv of the held-out folder")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "model folder that wrote --report")
_TITLE = flags.DEFINE_string("title", "", "figure title")
_OUT = flags.DEFINE_string("out", None, "PNG to write", required=True)


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _REPORT.value and not _LABELS.value:
        raise app.UsageError("--report needs --labels (the held-out folder's labels.csv)")
    sets = {}
    try:
        if _CV.value:
            cv = json.loads(pathlib.Path(_CV.value).read_text())
            sets["training folder, out of fold"] = evaluation.roc_inputs(
                cv["oof_reports"], cv["truth"]
            )
        if _REPORT.value:
            rows = json.loads(pathlib.Path(_REPORT.value).read_text())["studies"]
            truth = {r["filename"]: r for r in studies.read_labels(_LABELS.value)}
            missing = [r["file"] for r in rows if r["file"] not in truth]
            if missing:
                raise ValueError(f"{_LABELS.value}: no labels for {missing[:3]}")
            held = evaluation.roc_inputs(rows, [truth[r["file"]] for r in rows])
            if _MODEL_DIR.value:
                meta = json.loads((pathlib.Path(_MODEL_DIR.value) / "model.json").read_text())
                point = meta["operating_point"]
                held["fit_point"] = (point["oof_sensitivity"], point["oof_specificity"])
            sets["held-out folder"] = held
    except KeyError as e:  # a JSON of another kind
        sys.exit(
            f"error: no {e} (--cv takes perfusion_cv --model=clinical's JSON, --report a report)"
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if not sets:
        raise app.UsageError("give --cv, or --report with --labels")
    perfusion_figures.plot_roc(sets, _OUT.value, title=_TITLE.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

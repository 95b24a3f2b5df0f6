"""The seed's Table 1 (normal vs abnormal, 5-fold CV) on study folders, beside the paper's.

python experiments/perfusion_table1.py --data=data/clin_train,data/easy_train \
    --out=docs/perfusion_table1.md

Models: the methods of experiments.studies.perfusion_compare (strip_rf, polar_logistic, cnn,
...) or the older names of perfusion.classifiers (rf, xgb, xgb_tuned, resnet50, resnet152).
"""

import datetime
import os
import platform
import shlex
import sys

from absl import app, flags

from cardiac_core.fileio import atomic_write_bytes
from cardiac_core.logs import quiet_third_party
from experiments.studies import perfusion_compare
from perfusion import classifiers, studies

_DATA = flags.DEFINE_list("data", None, "study folders (images/ + labels.csv)", required=True)
_OUT = flags.DEFINE_string("out", "docs/perfusion_table1.md", "output markdown")
_MODELS = flags.DEFINE_list(
    "models", list(perfusion_compare.METHODS), "methods / models to compare"
)
_FOLDS = flags.DEFINE_integer("folds", 5, "number of stratified folds")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the folds and the models")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sections = [
        f"# Perfusion Table 1: normal vs abnormal, {_FOLDS.value}-fold CV (seed {_SEED.value})\n\n"
        f"Command: `python {' '.join(map(shlex.quote, sys.argv))}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{datetime.date.today()}. Ours: pooled out-of-fold value (95% bootstrap interval)."
    ]
    try:
        for folder in _DATA.value:
            data = studies.read_study_folder(folder, progress=True)
            results = perfusion_compare.table1_results(
                data, _MODELS.value, folds=_FOLDS.value, seed=_SEED.value
            )
            counts = {lab: sum(s.label == lab for s in data) for lab in studies.LABELS}
            title = f"## `{folder}`: {len(data)} studies {counts}"
            sections.append(classifiers.table1_markdown(results, title=title))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    text = "\n\n".join(sections)
    atomic_write_bytes(_OUT.value, text.encode())
    print(text)


if __name__ == "__main__":
    app.run(main)

"""The seed's Table 1 (normal vs abnormal, 5-fold CV) on a study folder, beside the paper's.

python experiments/perfusion_table1.py --data=DIR --out=docs/perfusion_table1.md
"""

import datetime
import os
import platform
import shlex
import sys

from absl import app, flags

from perfusion import classifiers, studies
from tavr_jax.fileio import atomic_write_bytes

_DATA = flags.DEFINE_string("data", None, "study folder (images/ + labels.csv)", required=True)
_OUT = flags.DEFINE_string("out", "docs/perfusion_table1.md", "output markdown")
_MODELS = flags.DEFINE_list("models", ["rf", "xgb", "xgb_tuned"], "models (rf, xgb, resnet50...)")
_FOLDS = flags.DEFINE_integer("folds", 5, "number of stratified folds")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the folds and the models")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        data = studies.read_study_folder(_DATA.value, progress=True)
        results = {
            m: classifiers.run_study_cv(data, "abnormal", m, folds=_FOLDS.value, seed=_SEED.value)
            for m in _MODELS.value
        }
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    counts = {lab: sum(s.label == lab for s in data) for lab in studies.LABELS}
    title = (
        f"# Perfusion Table 1: normal vs abnormal, {_FOLDS.value}-fold CV (seed {_SEED.value})\n\n"
        f"Data: `{_DATA.value}`, {len(data)} studies {counts} (a folder from "
        "`experiments/make_perfusion_data.py` or a real export). Ours: pooled out-of-fold value "
        f"(95% bootstrap interval). Command: `python {' '.join(map(shlex.quote, sys.argv))}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{datetime.date.today()}."
    )
    text = classifiers.table1_markdown(results, title=title)
    atomic_write_bytes(_OUT.value, text.encode())
    print(text)


if __name__ == "__main__":
    app.run(main)

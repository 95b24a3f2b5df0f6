"""Every perfusion method side by side: the same folds and bootstrap, and a difficulty curve.

python experiments/perfusion_compare.py --data=data/clin_train --out=runs/perfusion_compare.json \
    --levels=data/depth_0.10,data/depth_0.20 --markdown=runs/methods.md \
    --plot=docs/perfusion_difficulty.png --table1=docs/perfusion_table1.md
"""

import datetime
import os
import platform
import shlex
import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from experiments.studies import perfusion_compare

_DATA = flags.DEFINE_string("data", None, "labelled study folder for the CV", required=True)
_LEVELS = flags.DEFINE_list("levels", [], "held-out folders of one defect depth each")
_METHODS = flags.DEFINE_list("methods", list(perfusion_compare.METHODS), "methods to compare")
_FOLDS = flags.DEFINE_integer("folds", 5, "stratified folds")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the folds, the models and the bootstrap")
_BOOT = flags.DEFINE_integer("n_boot", 1000, "bootstrap resamples of the out-of-fold predictions")
_OUT = flags.DEFINE_string("out", "perfusion_compare.json", "result JSON")
_MARKDOWN = flags.DEFINE_string("markdown", None, "write the tables here")
_PLOT = flags.DEFINE_string("plot", None, "write the difficulty curve here (PNG)")
_TABLE1 = flags.DEFINE_string("table1", None, "write normal vs abnormal as the seed's Table 1")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        result = perfusion_compare.run_comparison(
            _DATA.value,
            level_dirs=_LEVELS.value,
            methods=tuple(_METHODS.value),
            folds=_FOLDS.value,
            seed=_SEED.value,
            n_boot=_BOOT.value,
            progress=True,
        )
        header = (
            f"Command: `python {' '.join(map(shlex.quote, sys.argv))}`; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{datetime.date.today()}. Data: {result['counts']}."
        )
        perfusion_compare.write_comparison(
            result,
            _OUT.value,
            markdown=_MARKDOWN.value,
            plot=_PLOT.value,
            table1=_TABLE1.value,
            header=header,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(perfusion_compare.comparison_markdown(result["cv"]))


if __name__ == "__main__":
    app.run(main)

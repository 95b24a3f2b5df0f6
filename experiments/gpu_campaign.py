r"""The GPU campaign: every GPU measurement of the project in one device call (docs/gpu/).

    bash experiments/gpu_campaign.sh                     # on the GPU machine, results in $OUT
    python experiments/gpu_campaign.py --smoke --out=/tmp/smoke   # the same stages, tiny, CPU

Runs the stages of `experiments.benchmarks.campaign` (preflight, simulate, latency, engine,
train_throughput, training, perfusion) each under its own time limit, then writes
`campaign.json`. Exits 1 when any stage failed or ran out of time (the others still ran).
"""

import dataclasses
import os
import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from experiments.benchmarks import campaign

_OUT = flags.DEFINE_string("out", None, "results folder (at most 8 files)", required=True)
_WORK = flags.DEFINE_string("work", None, "scratch folder (default: OUT/../campaign_work)")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny sizes on the CPU (what make test runs)")
_WHEELS = flags.DEFINE_string("wheels", None, "folder of wheels to install first (.whl)")
_HEAD = flags.DEFINE_string("head", None, "head of the training run (default: the config's)")
_CONFIG = flags.DEFINE_list("config_overrides", [], "more --config.x=y flags of the training run")
_BUDGET = flags.DEFINE_float("budget_s", None, "wall-clock for all stages (default: the plan's)")
_FAIL = flags.DEFINE_enum("fail_stage", None, campaign.STAGES, "make this stage fail (tests)")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    plan = campaign.smoke_plan() if _SMOKE.value else campaign.gpu_plan()
    if _BUDGET.value:
        plan = dataclasses.replace(plan, budget_s=_BUDGET.value)
    work = _WORK.value or os.path.join(
        os.path.dirname(os.path.abspath(_OUT.value)), "campaign_work"
    )
    run = campaign.Campaign(
        plan, _OUT.value, work, wheels=_WHEELS.value, head=_HEAD.value,
        overrides=_CONFIG.value, fail_stage=_FAIL.value,
    )  # fmt: skip
    sys.exit(run.run())


if __name__ == "__main__":
    app.run(main)

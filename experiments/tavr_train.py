r"""Trains the TAVR grouped-keypoint network (resumes from W/checkpoints when present).

    python experiments/tavr_train.py --config=experiments/configs/tavr.py \
        --workdir=W --data=DIR [--config.backbone=resnet18 --config.num_steps=...]

Multi-host: run one process per host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (the global batch is split over all devices).
"""

import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from cardiac_core.logs import quiet_third_party

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (checkpoints, events, config)")
_DATA = flags.DEFINE_string("data", None, "a Supervisely project or a TFDS folder")
_COORD = flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of process 0")
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.mark_flags_as_required(["config", "workdir", "data"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if _COORD.value is not None:
        jax.distributed.initialize(
            coordinator_address=_COORD.value,
            num_processes=_NPROC.value,
            process_id=_PID.value,
        )
    from tavr_jax.run.lock import WorkdirLocked
    from tavr_jax.training.train import NaNLossError, train_and_evaluate

    try:
        metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value, _DATA.value)
    except (ValueError, OSError, WorkdirLocked, NaNLossError) as e:
        # One line each (another run holds the workdir, read-only, disk full, damaged
        # checkpoints): the cause, not a traceback.
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        print(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)

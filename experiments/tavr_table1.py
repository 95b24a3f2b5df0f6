r"""Table 1 of the paper: each backbone, both heads and the grouping ablation, one budget.

    python experiments/tavr_table1.py --data=DIR --out=docs/table1.md --steps=300 \
        --image_size=128 --backbones=resnet18,resnet34,resnet50,vgg16,efficientnet_b7 \
        --workdir_root=runs/table1 [--heads=integral,heatmap --ablation_head=regression]
    python experiments/tavr_table1.py --data=DIR --out=backbones.md \
        --backbone_head=heatmap --ablation_backbone= --backbones=resnet18,resnet34,...
The base config is experiments/configs/tavr.py:runlocal (override with --config and
--config.field=value); every variant trains in WORKDIR_ROOT/<variant> (resumed if present),
gets thresholds tuned on val cases, and is evaluated on held-out test cases.
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from cardiac_core.logs import quiet_third_party
from experiments.studies import table1

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/tavr.py:runlocal", "base training config"
)
_DATA = flags.DEFINE_string("data", None, "Supervisely project folder")
_OUT = flags.DEFINE_string("out", "docs/table1.md", "markdown table to write")
_STEPS = flags.DEFINE_integer("steps", 300, "training steps per variant")
_SIZE = flags.DEFINE_integer("image_size", 128, "network input size")
_BACKBONES = flags.DEFINE_list(
    "backbones", "resnet18,resnet34,resnet50,vgg16,efficientnet_b7", "backbones to compare"
)
_BACKBONE_HEAD = flags.DEFINE_string(
    "backbone_head", "regression", "head of the backbone rows (paper: regression)"
)
_ABLATION = flags.DEFINE_string(
    "ablation_backbone", "resnet34", "backbone of head/group rows ('' for backbone rows only)"
)
_HEADS = flags.DEFINE_list("heads", "integral,heatmap", "heads compared on the ablation backbone")
_ABLATION_HEAD = flags.DEFINE_string(
    "ablation_head", "regression", "head of the grouped / not grouped pair (paper: regression)"
)
_ROOT = flags.DEFINE_string("workdir_root", "runs/table1", "one training workdir per variant")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DATA.value:
        raise app.UsageError("--data is required")
    try:
        results = table1.run_table1(
            _CONFIG.value,
            _DATA.value,
            _OUT.value,
            backbones=_BACKBONES.value,
            steps=_STEPS.value,
            image_size=_SIZE.value,
            workdir_root=_ROOT.value,
            ablation_backbone=_ABLATION.value,
            heads=_HEADS.value,
            ablation_head=_ABLATION_HEAD.value,
            backbone_head=_BACKBONE_HEAD.value,
            command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"{len(results)} variants -> {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

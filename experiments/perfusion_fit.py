"""Fit the perfusion analysis model: normal limits, calibrated classifiers, segment model.

python experiments/perfusion_fit.py --data=data/perfusion_train --out=models/perfusion [--unet] \
    [--operating_point=sensitivity:0.95]

Settings come from experiments/configs/perfusion.py (`--config=` another file); a flag given
on the command line wins over the config.
"""

import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from cardiac_core.logs import quiet_third_party
from perfusion import analyze, classifiers

_DATA = flags.DEFINE_string(
    "data", None, "labelled study folder (images/, labels.csv)", required=True
)
_OUT = flags.DEFINE_string("out", None, "model directory to write", required=True)
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "perfusion.py"), "fit settings"
)
# Each flag, when given, wins over the config's field of the same name.
flags.DEFINE_enum(
    "model",
    None,
    ("auto", *classifiers.FEATURE_MODELS),
    "classifier on the polar features (auto: lowest out-of-fold log loss per task)",
)
flags.DEFINE_integer("size", None, "canonical polar grid (pixels)")
flags.DEFINE_string("colormap", None, "colormap name when images lack a colour bar")
flags.DEFINE_float("k", None, "blackout at mean - k SD (default: tuned on masks/ or 2.5)")
flags.DEFINE_bool("unet", None, "also train the U-Net on the folder's masks/")
flags.DEFINE_integer("unet_steps", None, "U-Net training steps")
flags.DEFINE_integer("unet_size", None, "U-Net input size (pixels, divisible by 4)")
flags.DEFINE_list("uncertain_band", None, "LOW,HIGH: probabilities in here are reported uncertain")
flags.DEFINE_string(
    "operating_point", None, "abnormal threshold: sensitivity:X, specificity:X or balanced"
)
flags.DEFINE_integer("seed", None, "random seed")


def _settings():
    """The config with the flags given on the command line applied."""
    c = _CONFIG.value
    names = ("model", "size", "colormap", "k", "unet", "unet_steps", "unet_size", "seed")
    for name in (*names, "operating_point"):
        if flags.FLAGS[name].present:
            c[name] = flags.FLAGS[name].value
    if flags.FLAGS["uncertain_band"].present:
        c.uncertain_band = tuple(float(v) for v in flags.FLAGS.uncertain_band)
    return c


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = _settings()
    unet_config = None
    if c.unet:
        from perfusion import cnn

        unet_config = cnn.UNetConfig(size=c.unet_size, steps=c.unet_steps, seed=c.seed)
    try:
        meta = analyze.fit(
            _DATA.value,
            _OUT.value,
            model=c.model,
            size=c.size,
            colormap=c.colormap,
            k=c.k,
            uncertain_band=tuple(float(v) for v in c.uncertain_band),
            operating_point=c.operating_point,
            unet=c.unet,
            unet_config=unet_config,
            seed=c.seed,
            progress=True,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    shown = ("score_config", "operating_point", "fit")
    print(json.dumps({k: meta[k] for k in shown}, indent=1))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

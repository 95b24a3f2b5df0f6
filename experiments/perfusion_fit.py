"""Fit the perfusion analysis model: normal limits, calibrated classifiers, segment model.

python experiments/perfusion_fit.py --data=data/perfusion_train --out=models/perfusion [--unet]
"""

import json
import sys

from absl import app, flags

from perfusion import analyze, classifiers

_DATA = flags.DEFINE_string(
    "data", None, "labelled study folder (images/, labels.csv)", required=True
)
_OUT = flags.DEFINE_string("out", None, "model directory to write", required=True)
_MODEL = flags.DEFINE_enum(
    "model",
    "auto",
    ("auto", *classifiers.FEATURE_MODELS),
    "classifier on the polar features (auto: lowest out-of-fold log loss per task)",
)
_SIZE = flags.DEFINE_integer("size", 128, "canonical polar grid (pixels)")
_COLORMAP = flags.DEFINE_string("colormap", None, "colormap name when images lack a colour bar")
_K = flags.DEFINE_float("k", None, "blackout at mean - k SD (default: tuned on masks/ or 2.5)")
_UNET = flags.DEFINE_bool("unet", False, "also train the U-Net on the folder's masks/")
_UNET_STEPS = flags.DEFINE_integer("unet_steps", 500, "U-Net training steps")
_UNET_SIZE = flags.DEFINE_integer("unet_size", 32, "U-Net input size (pixels, divisible by 4)")
_BAND = flags.DEFINE_list(
    "uncertain_band", ["0.25", "0.75"], "LOW,HIGH: probabilities in here are reported uncertain"
)
_SEED = flags.DEFINE_integer("seed", 0, "random seed")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unet_config = None
    if _UNET.value:
        from perfusion import cnn

        unet_config = cnn.UNetConfig(
            size=_UNET_SIZE.value, steps=_UNET_STEPS.value, seed=_SEED.value
        )
    try:
        meta = analyze.fit(
            _DATA.value,
            _OUT.value,
            model=_MODEL.value,
            size=_SIZE.value,
            colormap=_COLORMAP.value,
            k=_K.value,
            uncertain_band=tuple(float(v) for v in _BAND.value),
            unet=_UNET.value,
            unet_config=unet_config,
            seed=_SEED.value,
            progress=True,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"score_config": meta["score_config"], "fit": meta["fit"]}, indent=1))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

r"""The perfusion study's fit: what `perfusion_fit` builds from a labelled study folder (and
what `perfusion_cv --model=clinical` fits in every fold).

  python experiments/perfusion_fit.py --data=DIR --out=MODEL \
      [--config=experiments/configs/perfusion.py] [--config.model=xgb] [--model=xgb] \
      [--operating_point=specificity:0.9]

A flag given on the command line (`--model`, `--unet`, ...) wins over the config's field of
the same name.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "auto"  # classifier on the polar features; auto: lowest out-of-fold log loss per task
    c.size = 128  # canonical polar grid (pixels)
    c.colormap = ml_collections.FieldReference(None, field_type=str)  # when images lack a bar
    c.k = ml_collections.FieldReference(None, field_type=float)  # blackout SDs; None: tuned
    c.uncertain_band = (0.25, 0.75)  # around 0.5; moved to the operating point's threshold
    # Sensitivity first: the test rules disease out, so the abnormal threshold is the most
    # specific of those that call at least 95% of the training folder's abnormal studies
    # abnormal out of fold (also "specificity:0.9", or "balanced" for Youden's J).
    c.operating_point = "sensitivity:0.95"
    c.unet = False  # also train the U-Net on the folder's masks/
    c.unet_steps = 500
    c.unet_size = 32  # pixels, divisible by 4
    c.seed = 0
    return c

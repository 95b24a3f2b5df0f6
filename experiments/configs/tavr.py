r"""TAVR grouped-keypoint training: the paper's setup (ResNet34, 512 px, 3 groups).

  python experiments/tavr_train.py --config=experiments/configs/tavr.py \
      --workdir=W --data=DIR

Overrides: `--config.backbone=resnet18 --config.image_size=256 --config.num_steps=2000
--config.head=integral --config.grouped=False --config.dtype=bfloat16
--config.optimizer=adam_plateau`.
A small preset that runs on a CPU in a few minutes:

  python experiments/tavr_train.py --config=experiments/configs/tavr.py:runlocal \
      --workdir=W --data=DIR
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default config; `arg="runlocal"` shrinks it to a few CPU minutes."""
    c = ml_collections.ConfigDict()
    c.schema = "paper11"  # a schema name or a path to a schema .json
    c.backbone = "resnet34"  # resnet18|resnet34|resnet50|vgg16|efficientnet_b7|resnet_tiny
    c.head = "regression"  # regression (the paper) | integral (soft-argmax heatmaps)
    c.grouped = True
    c.pretrained = ""  # optional path to a torchvision-style .npz/.pth state dict
    c.image_size = 512
    c.batch_size = 32  # global, split over all devices of all processes
    c.num_steps = 20_000
    c.dtype = "float32"  # float32 | bfloat16 (bf16 compute, fp32 master weights)

    # Optimiser: adamw = warm-up + cosine decay; adam_plateau = the paper's Adam 1e-3 with
    # the learning rate scaled down when the training loss stops improving.
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.warmup_steps = 500
    c.weight_decay = 1e-4
    c.grad_clip = 1.0  # global norm; 0 = off
    c.ema_decay = 0.0  # 0 = no EMA of the weights
    c.plateau = ml_collections.ConfigDict(
        dict(factor=0.5, patience=500, cooldown=0, accumulation_size=50, min_scale=1e-3)
    )

    # Loss weights of the paper (section 3.2): group BCE, visibility focal, coordinate Wing.
    c.l1 = 1.0
    c.l2 = 1.0
    c.l3 = 1.0

    # On-device augmentation (the reference's set, SPEC section A); fields of
    # tavr_jax.data.augment.AugmentConfig.
    c.augment_enabled = True
    c.augment = ml_collections.ConfigDict(
        dict(
            brightness=(0.8, 1.2),
            contrast=(0.8, 1.2),
            blur_prob=0.3,
            blur_sigma=(0.1, 2.0),
            noise_prob=0.2,
            noise_std=(2.0, 8.0),
            scale=0.3,
            rotation_sigma_deg=40.0,
            rotation_prob=0.8,
            flip_prob=0.5,
        )
    )

    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep = 2
    c.log_every = 50
    c.seed = 0

    # Data: case-level split of the Supervisely project.
    c.num_workers = 0  # grain worker processes (0 = in the main process)
    c.val_fraction = 0.2
    c.test_fraction = 0.0
    c.data_seed = 0

    if arg == "runlocal":
        c.backbone = "resnet18"
        c.image_size = 128
        c.batch_size = 16
        c.num_steps = 300
        c.warmup_steps = 30
        c.eval_every = 100
        c.checkpoint_every = 100
        c.log_every = 10
    elif arg not in (None, ""):
        raise ValueError(f"unknown config arg {arg!r}; known: runlocal")
    return c

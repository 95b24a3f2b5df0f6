"""The study configs in experiments/configs/ and the one place the loss defaults live."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

from tavr_jax.config import get_config
from tavr_jax.training import losses


def _study(name):
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def test_quick_preset_is_the_demo_network_with_a_test_split():
    quick = _study("tavr_quick")
    assert quick.backbone == "resnet18_half" and quick.image_size == 128
    assert quick.num_steps == get_config("runlocal").num_steps == 800
    assert quick.data.test_fraction == 0.2


def test_paper_scale_and_gpu_campaign_runs():
    paper = _study("tavr_paper_scale")
    assert (paper.backbone, paper.image_size, paper.batch_size) == ("resnet34", 512, 32)
    assert paper.head == "heatmap" and paper.data.test_fraction == 0.15
    gpu = _study("tavr_gpu_campaign")
    assert gpu.dtype == "bfloat16" and (gpu.eval_every, gpu.checkpoint_every) == (2000, 4000)
    # The campaign's run is the paper-scale one in bf16, nothing else changed.
    gpu.dtype, gpu.eval_every, gpu.checkpoint_every = "float32", 1000, 1000
    assert gpu.to_dict() == paper.to_dict()


def test_the_paper_loss_is_the_configs_loss_with_the_paper_preset():
    by_hand = {
        "weights": {"group": 1.0, "visibility": 1.0, "coords": 1.0, "heatmap": 1.0},
        "visibility_loss": "focal",
        "focal_alpha": 0.25,
        "focal_gamma": 2.0,
        "wing_w": 10.0,
        "wing_eps": 2.0,
        "heatmap_sigma_px": 4.0,
    }
    assert losses.PAPER_LOSS == by_hand
    default = get_config().loss.to_dict()
    assert {k: v for k, v in default.items() if k not in ("weights", "visibility_loss")} == {
        k: v for k, v in by_hand.items() if k not in ("weights", "visibility_loss")
    }


@pytest.mark.slow
def test_perfusion_fit_takes_the_config_and_a_given_flag_wins(tmp_path):
    from perfusion import simulate

    simulate.simulate_dataset(tmp_path / "data", 24, seed=3)
    fit = [sys.executable, "experiments/perfusion_fit.py", f"--data={tmp_path / 'data'}"]
    run = subprocess.run(
        [*fit, f"--out={tmp_path / 'm'}", "--config.model=logistic", "--config.size=48",
         "--size=64", "--config.operating_point=balanced",
         "--operating_point=specificity:0.9"],  # fmt: skip
        capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["size"] == 64  # the flag over the config
    assert meta["operating_point"]["rule"] == "specificity:0.9"
    assert meta["operating_point"]["oof_specificity"] >= 0.9
    assert '"model": "logistic"' in (tmp_path / "m" / "model.json").read_text()

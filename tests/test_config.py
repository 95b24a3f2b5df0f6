"""The training config: the default recipe, the presets, dotted overrides."""

import pytest

from tavr_jax.config import HEAD_RECIPES, PAPER_RECIPE, apply_overrides, get_config


def test_default_is_the_best_measured_head_at_paper_scale():
    c = get_config()
    assert (c.backbone, c.image_size, c.head) == ("resnet34", 512, "heatmap")
    assert (c.loss.visibility_loss, c.loss.weights.coords) == ("bce", 0.1)
    assert c.dense_visibility


def test_runlocal_trains_the_same_recipe_small():
    c, default = get_config("runlocal"), get_config()
    assert (c.backbone, c.image_size, c.batch_size, c.num_steps) == ("resnet18_half", 128, 16, 800)
    assert c.head == default.head and c.loss == default.loss


def test_paper_preset_restores_the_papers_head_and_loss():
    c = get_config("runlocal,paper")
    assert (c.head, c.loss.visibility_loss, c.loss.weights.coords) == ("regression", "focal", 1.0)
    assert c.backbone == "resnet18_half" and c.loss.weights.heatmap == 1.0
    assert set(PAPER_RECIPE) == {"head", "loss.visibility_loss", "loss.weights.coords"}


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown config preset"):
        get_config("runlocal,fast")


def test_apply_overrides_sets_dotted_fields_on_a_copy():
    base = get_config("runlocal")
    c = apply_overrides(base, {"head": "integral", "loss.visibility_loss": "focal"})
    assert (c.head, c.loss.visibility_loss) == ("integral", "focal")
    assert (base.head, base.loss.visibility_loss) == ("heatmap", "bce")
    with pytest.raises(ValueError, match="unknown config field 'loss.nope'"):
        apply_overrides(base, {"loss.nope": 1})


def test_head_recipes_apply_to_the_default():
    for head, recipe in HEAD_RECIPES.items():
        c = apply_overrides(get_config(), recipe)
        assert c.head == head
    integral = apply_overrides(get_config(), HEAD_RECIPES["integral"])
    assert (integral.loss.visibility_loss, integral.loss.weights.coords) == ("bce", 1.0)

"""Table 1: variants, the markdown beside the paper's rows, and the resumable run."""

import json

import pytest
from _workdirs import TINY_CONFIG, write_tiny_checkpoint, write_tiny_project

from experiments.studies import table1
from tavr_jax.config import get_config


def _metrics(f1, precision=0.9, recall=0.8, err=12.5, acc=0.75, pim_f1=None, width=512.0):
    return {
        "precision": precision, "recall": recall, "f1": f1, "mean_error_px": err,
        "loc_accuracy_20px": acc, "per_image_mean": {"f1": f1 if pim_f1 is None else pim_f1},
        "frame_width_px": width, "train_seconds": 61.0,
    }  # fmt: skip


def test_table1_variants():
    V = table1.TableRow
    assert table1.table1_variants(["resnet18", "resnet34"]) == [
        V("resnet18"), V("resnet34"), V("resnet34", head="integral"), V("resnet34", head="heatmap"),
        V("resnet34", grouped=False),
    ]  # fmt: skip
    assert table1.table1_variants(["vgg16"], "resnet_tiny", heads=["integral"])[1:] == [
        V("resnet_tiny"), V("resnet_tiny", head="integral"), V("resnet_tiny", grouped=False)
    ]  # fmt: skip
    # The grouping ablation with another head brings its grouped arm along.
    assert table1.table1_variants(["resnet18"], "resnet18", heads=[], ablation_head="heatmap") == [
        V("resnet18"), V("resnet18", head="heatmap"), V("resnet18", head="heatmap", grouped=False)
    ]  # fmt: skip
    assert V("resnet34", grouped=False).name == "resnet34-regression-ungrouped"
    # Backbone rows only, with another head.
    assert table1.table1_variants(["resnet18", "vgg16"], "", backbone_head="heatmap") == [
        V("resnet18", head="heatmap"), V("vgg16", head="heatmap")
    ]  # fmt: skip


def test_table1_markdown_rows_and_ablation():
    V = table1.TableRow
    results = [
        (V("resnet34"), _metrics(0.9, err=12.5, width=512.0, pim_f1=0.88)),
        (V("resnet34", head="integral"), _metrics(0.95, err=None, acc=None)),
        (V("resnet34", grouped=False), _metrics(0.8)),
    ]
    text = table1.table1_markdown(
        results, ablation_backbone="resnet34", command="python x.py", budget="10 steps",
        device="cpu", date="2026-11-21",
    )  # fmt: skip
    lines = text.splitlines()
    # Ours then the paper's row (error @1024 = 12.5 * 1024 / 512 = 25.00; paper 25.65 * 2).
    ours = lines.index("| ResNet34 | regression | yes | ours | 0.9000 | 0.8000 | 0.9000 | 12.50 "
                       "| 0.7500 | 25.00 | 0.8800 | 61 |")  # fmt: skip
    assert lines[ours + 1] == (
        "| ResNet34 | regression | yes | paper | 0.9235 | 0.9602 | 0.9332 | 25.65 | 0.5505 "
        "| 51.30 | - | - |"
    )
    assert "| ResNet34 | integral | yes | ours | 0.9000 | 0.8000 | 0.9500 | - | - | - |" in text
    assert sum(" | paper | " in line for line in lines) == 1  # only the paper's own setup
    # Ablation: 0.9 - 0.8 = +0.1000 F1 points, 0.1 / 0.8 = +12.5% relative: both hold.
    assert "F1 difference (grouped - not grouped): +0.1000 (+12.5% relative)" in text
    assert "0.08 F1 points, holds; read as 8% relative, holds" in text
    assert "Command: `python x.py`" in text and "2026-11-21" in text
    partial = table1.table1_markdown(
        results[:1], ablation_backbone="resnet34", command="", budget="", device="", date=""
    )
    assert "Not available" in partial
    # Backbone rows with another head: the paper's row (its regression head) beside each
    # backbone's first grouped row, and no ablation section.
    heatmap_rows = [
        (V("resnet34", head="heatmap"), _metrics(0.95)),
        (V("resnet34", head="heatmap", grouped=False), _metrics(0.94)),
        (V("vgg16", head="heatmap"), _metrics(0.9)),
    ]
    lines = table1.table1_markdown(
        heatmap_rows, ablation_backbone="", command="", budget="", device="", date=""
    ).splitlines()
    papers = [i for i, line in enumerate(lines) if " | paper | " in line]
    assert [lines[i - 1].split(" | ")[:3] for i in papers] == [
        ["| ResNet34", "heatmap", "yes"], ["| VGG16", "heatmap", "yes"]
    ]  # fmt: skip
    assert lines[papers[1]].startswith("| VGG16 | regression | yes | paper | 0.7726 |")
    assert not any("Grouped vs not grouped" in line for line in lines)


def test_run_table1_trains_each_variant_and_writes_table(tmp_path):
    data = write_tiny_project(tmp_path / "data", sizes=((32, 32),))
    seen = []

    def fake_train(config, workdir, data_dir):
        assert data_dir == data
        seen.append((config.backbone, config.head, config.grouped, config.num_steps,
                     config.image_size, config.data.test_fraction,
                     config.loss.visibility_loss, config.loss.weights.coords))  # fmt: skip
        write_tiny_checkpoint(workdir, config.to_dict())

    base = get_config("runlocal")
    base.update(TINY_CONFIG, batch_size=4)
    out = tmp_path / "docs" / "table1.md"
    results = table1.run_table1(
        base, data, out, backbones=["resnet_tiny"], steps=4, image_size=32,
        workdir_root=tmp_path / "runs", ablation_backbone="resnet_tiny", train_fn=fake_train,
        eval_batch_size=2,
    )  # fmt: skip
    # The regression rows (the paper's) train with the paper's loss, the others with the
    # default, except that the integral head (no heatmap term) keeps the Wing weight 1.
    assert seen == [
        ("resnet_tiny", "regression", True, 4, 32, 0.2, "focal", 1.0),
        ("resnet_tiny", "integral", True, 4, 32, 0.2, "bce", 1.0),
        ("resnet_tiny", "heatmap", True, 4, 32, 0.2, "bce", 0.1),
        ("resnet_tiny", "regression", False, 4, 32, 0.2, "focal", 1.0),
    ]
    assert base.num_steps == get_config("runlocal").num_steps  # the caller's is not modified
    for variant, m in results:
        saved = json.loads((tmp_path / "runs" / variant.name / "metrics_test.json").read_text())
        assert saved["split"] == "test" and saved["f1"] == m["f1"]
        # Per-patient counts add up to the pooled ones.
        tp, fp, fn = (sum(c[i] for c in m["case_counts"].values()) for i in range(3))
        assert (tp, fp, fn) == (m["counts"]["tp"], m["counts"]["fp"], m["counts"]["fn"])
        assert (tmp_path / "runs" / variant.name / "thresholds.json").exists()
    text = out.read_text()
    assert text.count(" | ours | ") == 4 and "## Grouped vs not grouped" in text
    assert "paired bootstrap, 1 test patients" in text
    assert "test split 2 frames of 1 cases, 32 px wide" in text
    # A finished variant is reused (resume); another budget retrains.
    seen.clear()
    table1.run_table1(
        base, data, out, backbones=["resnet_tiny"], steps=4, image_size=32,
        workdir_root=tmp_path / "runs", ablation_backbone="resnet_tiny", train_fn=fake_train,
    )  # fmt: skip
    assert seen == [] and out.read_text() == text


def test_run_table1_refuses_an_unknown_name_before_training(tmp_path):
    def never(*a):
        raise AssertionError("nothing may train")

    cases = [
        ({"backbones": ["resnet_tiny", "resnet_tyni"]}, "backbone 'resnet_tyni'"),
        ({"backbones": ["resnet_tiny"], "backbone_head": "heatmp"}, "head 'heatmp'"),
    ]
    for names, wrong in cases:
        with pytest.raises(ValueError, match=f"unknown {wrong}; known: "):
            table1.run_table1(get_config("runlocal"), tmp_path, tmp_path / "t.md", steps=4,
                              image_size=32, workdir_root=tmp_path / "runs", ablation_backbone="",
                              train_fn=never, **names)  # fmt: skip
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t.md").exists()


def test_grouping_verdict_reads_the_interval():
    def arm(f1, counts):
        return {"f1": f1, "case_counts": counts}

    wide_gain = {f"p{i}": [20, 0, 0] for i in range(6)}  # F1 1.0 everywhere
    poor = {f"p{i}": [10, 10, 10] for i in range(6)}  # F1 0.5 everywhere
    text = table1._grouping_verdict(arm(1.0, wide_gain), arm(0.5, poor))
    assert "[+0.5000, +0.5000] F1 points" in text
    assert "is confirmed read as 0.08 F1 points, and confirmed read as 8% relative" in text
    text = table1._grouping_verdict(arm(0.5, poor), arm(0.5, poor))
    assert "is refuted read as 0.08 F1 points, and refuted read as 8% relative" in text

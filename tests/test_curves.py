"""Learning curves: config overrides, reading TensorBoard scalars back, the resumable run."""

import json

import jax
import pytest
from _workdirs import TINY_CONFIG, write_tiny_checkpoint, write_tiny_project
from tensorboardX import SummaryWriter

from experiments.studies import curves
from tavr_jax.config import get_config
from tavr_jax.run.checkpoint import CheckpointStore
from tavr_jax.training import train


def _write_events(workdir, values):
    writer = SummaryWriter(str(workdir / "events"))
    for step, value in values:
        writer.add_scalar("val_f1", value, step)
        writer.add_scalar("loss", 1.0 / step, step)
    writer.close()


def test_read_scalars_round_trip_and_torn_tail(tmp_path):
    _write_events(tmp_path, [(100, 0.5), (200, 0.75), (300, 0.875)])
    scalars = train.read_scalars(tmp_path)
    assert [(s, v) for s, _, v in scalars["val_f1"]] == [(100, 0.5), (200, 0.75), (300, 0.875)]
    seconds = [t for _, t, _ in scalars["val_f1"]]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    loss = [(s, v) for s, _, v in scalars["loss"]]  # simple_value is a float32
    assert loss == [(s, pytest.approx(1 / s, rel=1e-6)) for s in (100, 200, 300)]
    path = next((tmp_path / "events").glob("events.out.tfevents.*"))
    # A run killed mid-write leaves a partial record: the complete ones are still read.
    path.write_bytes(path.read_bytes() + b"\x20\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    assert len(train.read_scalars(tmp_path)["val_f1"]) == 3
    with pytest.raises(FileNotFoundError, match="no TensorBoard events"):
        train.read_scalars(tmp_path / "missing")


def test_run_curves_trains_each_variant_once_and_scores_held_out_projects(tmp_path):
    data = write_tiny_project(tmp_path / "data")
    other = write_tiny_project(tmp_path / "other", sizes=((96, 96),), cases=2)
    seen = []

    def fake_train(config, workdir, data_dir):
        seen.append((config.head, config.loss.visibility_loss, config.num_steps, config.eval_every))
        cfg = {**config.to_dict(), **TINY_CONFIG, "head": config.head}
        _, variables = write_tiny_checkpoint(workdir, cfg)
        with CheckpointStore(workdir, async_save=False) as store:
            store.save(config.num_steps, jax.device_get(dict(variables)))
        _write_events(workdir, [(2, 0.25), (4, 0.5)])
        return {"stopped": "num_steps"}

    base = get_config("runlocal")
    variants = [
        curves.Variant("regression", {"head": "regression", "loss.visibility_loss": "focal"}),
        curves.Variant("heatmap_bce", {"head": "heatmap"}),  # the default loss: BCE
    ]
    kw = dict(workdir_root=tmp_path / "runs", test_projects={"other": other}, steps=4,
              eval_every=2, out=tmp_path / "curves.json", train_fn=fake_train,
              eval_batch_size=2)  # fmt: skip
    results = curves.run_curves(base, data, variants, **kw)
    assert seen == [("regression", "focal", 4, 2), ("heatmap", "bce", 4, 2)]
    entry = results["heatmap_bce"]
    assert [p[2] for p in entry["curve"]["val_f1"]] == [0.25, 0.5]
    assert entry["test"]["other"]["tuned"]["n_images"] == 4  # 2 cases x 2 frames, all scored
    assert entry["test"]["other"]["tuned"]["frame_width_px"] == 96
    assert 0 <= entry["val"]["calibration"]["ece"] <= 1
    counts = entry["test"]["other"]["case_counts_at_0.5"]
    assert sorted(counts) == ["case0", "case1"]
    at_half = entry["test"]["other"]["at_0.5"]
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    assert at_half["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    diff = curves.compare_variants(results, "heatmap_bce", "regression", n_boot=50)["other"]
    assert diff["n_cases"] == 2 and diff["f1_a"] == pytest.approx(at_half["f1"])
    assert json.loads((tmp_path / "curves.json").read_text()) == results
    # Finished variants are reused.
    seen.clear()
    assert curves.run_curves(base, data, variants, **kw) == results and seen == []
    curves.plot_curves(results, tmp_path / "c.png", frame_width_px=64)
    curves.plot_reliability(results, tmp_path / "r.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "r.png").exists()

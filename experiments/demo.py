"""`make demo`: both systems end to end on simulated data, in a few CPU minutes.

  python experiments/demo.py --out=demo_out [--tavr_steps=800 --perfusion_studies=150]

TAVR: simulate a Supervisely project, train the small preset (`runlocal`: ResNet18 at half
width, 128 px, heatmap head, 800 steps, about 6 CPU minutes), tune thresholds on the
validation cases, evaluate held-out test cases with the paper's metrics and write overlays.
Perfusion: simulate study folders, cross-validate the feature classifier for both tasks, fit
the clinical model on one folder, its normal-vs-abnormal call at the sensitivity-first
operating point of experiments/configs/perfusion.py, and analyse another (scores, territories,
overlays).
"""

import json
import pathlib
import sys
import time

from absl import app, flags

from cardiac_core.logs import quiet_third_party

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "demo_out", "Folder for everything the demo writes.")
# Many patients with few frames each: the quick preset generalises to new patients with the
# number of patients it saw, not frames (15 x 16 gave 32 px at 1024, 150 x 6 gives 19 px;
# docs/accuracy.md); simulating 900 frames takes seconds.
flags.DEFINE_integer("tavr_cases", 150, "Simulated patients (split by patient: train/val/test).")
flags.DEFINE_integer("tavr_frames", 6, "Frames per simulated patient.")
flags.DEFINE_integer("tavr_steps", None, "Training steps (default: the runlocal preset's).")
flags.DEFINE_integer("perfusion_studies", 150, "Simulated studies per perfusion folder.")


def _tavr_config(steps: int | None):
    from experiments.configs.tavr_quick import get_config

    # The quick preset holds out a test split: thresholds are tuned on the validation cases,
    # so the figures come from other cases.
    config = get_config()
    config.num_steps = steps or config.num_steps
    return config


def run_tavr(out: pathlib.Path) -> dict:
    from cardiac_core.fileio import write_json_atomic
    from tavr_jax import get_schema
    from tavr_jax.data.simulate import simulate_project
    from tavr_jax.infer.evaluate import evaluate_project, tune_project
    from tavr_jax.training.train import train_and_evaluate

    config = _tavr_config(FLAGS.tavr_steps)
    data, workdir = out / "tavr_data", out / "tavr_run"
    print(f"[1/5] simulating {FLAGS.tavr_cases} TAVR cases x {FLAGS.tavr_frames} frames -> {data}")
    simulate_project(
        data, get_schema(config.schema), cases=FLAGS.tavr_cases, frames=FLAGS.tavr_frames,
        size=256, seed=0,
    )  # fmt: skip
    print(
        f"[2/5] training {config.backbone} ({config.head} head) at {config.image_size}px "
        f"for {config.num_steps} steps"
    )
    t0 = time.time()
    train_and_evaluate(config, workdir, data)
    train_s = time.time() - t0
    print("[3/5] tuning thresholds on validation cases, evaluating test cases with overlays")
    tune_project(workdir, data)
    metrics = evaluate_project(workdir, data, split="test", overlays_dir=out / "tavr_overlays")
    metrics["train_seconds"] = train_s
    write_json_atomic(out / "tavr_metrics.json", metrics)
    return metrics


def run_perfusion(out: pathlib.Path) -> dict:
    from perfusion import analyze, simulate, studies
    from perfusion.classifiers import run_study_cv

    n = FLAGS.perfusion_studies
    train_dir, test_dir = out / "perfusion_train", out / "perfusion_test"
    print(f"[4/5] simulating 2 x {n} perfusion studies, cross-validating the feature classifier")
    simulate.simulate_dataset(train_dir, n, seed=0, progress=True)
    simulate.simulate_dataset(test_dir, n, seed=1, progress=True)
    folder = studies.read_study_folder(train_dir, progress=True)
    cv = {
        task: run_study_cv(folder, task, "rf", folds=5, n_boot=200)
        for task in ("abnormal", "ischemia_vs_infarction")
    }
    (out / "perfusion_cv.json").write_text(json.dumps(cv, indent=1, default=str))
    print("[5/5] fitting normal limits + classifiers, analysing the held-out folder")
    from experiments.configs import perfusion as perfusion_config

    operating_point = perfusion_config.get_config().operating_point  # sensitivity first
    analyze.fit(train_dir, out / "perfusion_model", operating_point=operating_point, progress=True)
    analyze.analyze_path(
        out / "perfusion_model", test_dir, out / "perfusion_report.json",
        overlay_dir=out / "perfusion_overlays", metrics_out=out / "perfusion_metrics.json",
        progress=True,
    )  # fmt: skip
    return {"cv": cv, "heldout": json.loads((out / "perfusion_metrics.json").read_text())}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    del argv
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        tavr = run_tavr(out)
        perf = run_perfusion(out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    rows = [
        ("TAVR keypoints, held-out cases", "precision", _fmt(tavr["precision"])),
        ("", "recall", _fmt(tavr["recall"])),
        ("", "F1", _fmt(tavr["f1"])),
        ("", "mean error (px, original frame)", _fmt(tavr["mean_error_px"])),
        ("", "localisation accuracy (20 px)", _fmt(tavr["loc_accuracy_20px"])),
        ("", "training wall time (s)", f"{tavr['train_seconds']:.0f}"),
    ]
    for task, res in perf["cv"].items():
        m = res["metrics"]
        rows.append((f"Perfusion RF 5-fold CV: {task}", "accuracy", _fmt(m["accuracy"]["value"])))
        rows.append(("", "ROC AUC", _fmt(m["roc_auc"]["value"])))
    held = perf["heldout"]
    rows += [
        ("Perfusion fit/analyze, held-out folder", "label accuracy", _fmt(held["label_accuracy"])),
        ("", "sensitivity at the operating point", _fmt(held["sensitivity"])),
        ("", "specificity at the operating point", _fmt(held["specificity"])),
        ("", "territory accuracy (exact set)", _fmt(held["territory_exact_accuracy"])),
        ("", "per-segment defect F1", _fmt(held["segment"]["f1"])),
    ]
    print(f"\nResults (simulated data, {time.time() - t0:.0f} s in all)")
    width = max(len(r[0]) for r in rows)
    for group, name, value in rows:
        print(f"  {group:<{width}}  {name:<34} {value}")
    print("\nWritten:")
    for path in sorted(out.iterdir()):
        print(f"  {path}{'/' if path.is_dir() else ''}")


if __name__ == "__main__":
    app.run(main)

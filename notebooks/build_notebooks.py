"""Writes the Colab-ready notebooks of this folder from the cell sources below.

  python notebooks/build_notebooks.py

Edit the cells here, not in the .ipynb files: the notebooks are generated without outputs
(execution_count null), and tests/test_notebooks.py executes each of them.
"""

from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

# The first code cell of every notebook: in Colab, clone the repository and install it; locally
# (the package is already installed with `pip install -e .`) it does nothing.
INSTALL = r"""# Colab: set REPO_URL (or env CARDIAC_JAX_REPO) to where this repository is hosted.
import os
import subprocess
import sys

REPO_URL = os.environ.get("CARDIAC_JAX_REPO", "https://github.com/YOUR_ORG/cardiac-jax.git")

if "google.colab" in sys.modules:
    if "YOUR_ORG" in REPO_URL:
        raise ValueError("set REPO_URL in this cell to where the cardiac-jax repository is hosted")
    REPO_CLONE = "/content/cardiac-jax"
    if not os.path.isdir(REPO_CLONE):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, REPO_CLONE], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_CLONE], check=True)
    # An editable install is only seen by kernels started after it: add the path by hand.
    sys.path.insert(0, REPO_CLONE)"""

DEVICES = '''import jax

# jax uses the runtime's GPU when there is one (Colab: Runtime > Change runtime type).
print("jax", jax.__version__, "| backend:", jax.default_backend(), "| devices:", jax.devices())
ON_GPU = jax.default_backend() == "gpu"'''

WORKDIR = '''# All outputs go under WORK (relative to the current directory; /content in Colab).
WORK = pathlib.Path(os.environ.get("NOTEBOOK_WORKDIR", "cardiac_jax_work")).resolve() / {name!r}
WORK.mkdir(parents=True, exist_ok=True)
# Compiled programs are cached on disk: re-running a cell or the notebook skips compilation.
jax.config.update("jax_compilation_cache_dir", str(WORK.parent / "jax_cache"))
# CI sets NOTEBOOK_SMOKE=1 to run every notebook top to bottom with the tiniest settings.
SMOKE = os.environ.get("NOTEBOOK_SMOKE") == "1"'''


def _cells(spec: list[tuple[str, str]], stem: str) -> list:
    make = {"md": new_markdown_cell, "code": new_code_cell}
    # Fixed cell ids keep the generated files stable under rebuilds (nbformat draws random ones).
    return [
        make[kind](source.strip("\n"), id=f"{stem}-{i:02d}")
        for i, (kind, source) in enumerate(spec)
    ]


TAVR = [
    (
        "md",
        """
# TAVR keypoints: quick start

Simulate a small aortography project, look at frames with their keypoints, train the grouped
keypoint network for a few steps, tune the visibility thresholds on the validation cases,
evaluate on held-out test cases and look at the overlays (truth as circles, predictions as
crosses, coloured by group).

Runs top to bottom on a CPU runtime in a few minutes; a GPU runtime is used when present
(and trains longer). The few training steps here show the mechanics, not the accuracy of the
paper's setup (`experiments/configs/tavr.py`).
""",
    ),
    ("code", INSTALL),
    (
        "code",
        """
import json
import logging
import os
import pathlib
import shutil

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from tavr_jax.config import get_config
from tavr_jax.data.simulate import simulate_project
from tavr_jax.data.supervisely import read_project
from tavr_jax.infer.evaluate import evaluate_project, tune_project
from tavr_jax.schema import get_schema
from tavr_jax.training.train import train_and_evaluate
from tavr_jax.visualize import draw_keypoints, group_color

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notices on read-only checkpoints
""",
    ),
    ("code", DEVICES),
    ("md", "## Parameters"),
    (
        "code",
        WORKDIR.format(name="tavr")
        + """

SCHEMA = "paper11"  # the paper's 11 points in 3 groups
CASES, FRAMES, FRAME_SIZE = 12, 6, 128  # simulated cases, frames per case, frame pixels
BACKBONE, IMAGE_SIZE, BATCH, STEPS = "resnet18", 128, 8, 120  # about 2 min on 2 CPU cores
if ON_GPU:
    CASES, FRAMES, FRAME_SIZE = 40, 8, 256
    IMAGE_SIZE, BATCH, STEPS = 256, 32, 1500
if SMOKE:
    CASES, FRAMES, FRAME_SIZE = 6, 3, 96
    BACKBONE, IMAGE_SIZE, BATCH, STEPS = "resnet_tiny", 64, 8, 8
    jax.config.update("jax_disable_most_optimizations", True)  # compiles faster, runs slower
print(dict(cases=CASES, frames=FRAMES, backbone=BACKBONE, image_size=IMAGE_SIZE, steps=STEPS))
""",
    ),
    (
        "md",
        "## Simulate a project\n"
        "A Supervisely project: one folder per case, a PNG and a JSON annotation per frame.",
    ),
    (
        "code",
        """
schema = get_schema(SCHEMA)
shutil.rmtree(WORK / "data", ignore_errors=True)  # no cases left over from a larger earlier run
data_dir = simulate_project(
    WORK / "data", schema, cases=CASES, frames=FRAMES, size=FRAME_SIZE, seed=0, progress=False
)
project = read_project(data_dir, schema)
print(project.counts)
print("groups:", schema.group_names)
print("points:", schema.point_names)
""",
    ),
    (
        "code",
        """
# The middle frame of up to 8 cases, keypoints coloured by group.
by_case = {}
for i, record in enumerate(project.frames):
    by_case.setdefault(record.case_id, []).append(i)
shown = [frames[len(frames) // 2] for frames in list(by_case.values())[:8]]
fig, axes = plt.subplots(2, (len(shown) + 1) // 2, figsize=(3 * ((len(shown) + 1) // 2), 6.4))
for ax in axes.ravel():
    ax.axis("off")
for ax, i in zip(axes.ravel(), shown):
    record = project.frames[i]
    image = project.load_image(i)
    ax.imshow(draw_keypoints(image, record.coords, record.visible, schema, labels=False))
    ax.set_title(f"{record.case_id} / {record.stage}", fontsize=8)
handles = [
    Patch(color=np.array(group_color(g)) / 255, label=name)
    for g, name in enumerate(schema.group_names)
]
fig.legend(handles=handles, loc="lower center", ncol=len(handles))
plt.show()
""",
    ),
    (
        "md",
        "## Train a little\nThe `runlocal` preset of `tavr_jax.config` (what "
        "`experiments/configs/tavr.py` serves), made smaller.",
    ),
    (
        "code",
        """
config = get_config("runlocal")
config.schema = SCHEMA
config.backbone = BACKBONE
config.image_size = IMAGE_SIZE
config.batch_size = BATCH
config.num_steps = STEPS
config.optimizer.warmup_steps = max(1, STEPS // 10)
config.eval_every = config.checkpoint_every = STEPS  # one validation and one checkpoint
config.log_every = max(1, STEPS // 10)
config.data.val_fraction = 0.2  # cases, not frames: val and test cases are never trained on
config.data.test_fraction = 0.2

workdir = WORK / "train"
# train_and_evaluate resumes from the checkpoints it finds: start fresh on every run here.
shutil.rmtree(workdir, ignore_errors=True)
final = train_and_evaluate(config, workdir, data_dir)
print({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})
""",
    ),
    ("md", "## Tune thresholds on validation, evaluate on test"),
    (
        "code",
        """
tuned = tune_project(workdir, data_dir, batch_size=8)
print("tuned point thresholds:", tuned["points"])
overlays = WORK / "overlays"
metrics = evaluate_project(workdir, data_dir, split="test", batch_size=8, overlays_dir=overlays)
for key in ("n_images", "precision", "recall", "f1", "mean_error_px", "loc_accuracy_20px"):
    print(f"{key:>18}: {metrics[key]}")
print("per group F1:", json.dumps({g: m["f1"] for g, m in metrics["per_group"].items()}))
""",
    ),
    (
        "code",
        """
# Overlays of test frames: truth as circles, predictions as crosses (with probabilities).
paths = sorted(overlays.glob("*.png"))
paths = paths[:: max(1, len(paths) // 4)][:4]  # spread over the test cases
fig, axes = plt.subplots(1, len(paths), figsize=(4 * len(paths), 4), squeeze=False)
for ax, path in zip(axes[0], paths):
    ax.imshow(plt.imread(path))
    ax.set_title(path.stem, fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()
""",
    ),
]

PERFUSION = [
    (
        "md",
        """
# SPECT perfusion polar maps: quick start

Simulate labelled stress/rest polar-map studies at clinical difficulty (mild and small defects,
attenuation that mimics them, infarcts with peri-infarct ischemia, 60% normal studies), read
them back from their images (disk detection and colour-bar matching), compare methods on the
same folds (the published strip/ring features, TPD alone, deviations from sex-specific normal
limits), then fit the analysis model (normal limits, calibrated classifiers, a per-segment
defect model) and analyse held-out studies: label with calibrated probabilities and an
"uncertain" flag, 17-segment scores, SSS/SRS/SDS, TPD, territories, and an overlay.

Runs top to bottom on a CPU runtime in a few minutes.
""",
    ),
    ("code", INSTALL),
    (
        "code",
        """
import json
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np
from sklearn.feature_selection import f_classif

from perfusion import analyze, features, studies
from experiments.studies import perfusion_compare
from perfusion.simulate import simulate_dataset
""",
    ),
    ("code", DEVICES),
    ("md", "## Parameters"),
    (
        "code",
        WORKDIR.format(name="perfusion")
        + """

N_TRAIN, N_TEST, FOLDS, N_BOOT = 200, 60, 5, 1000  # studies; 60% of them normal
if SMOKE:
    N_TRAIN, N_TEST, FOLDS, N_BOOT = 40, 10, 3, 100
DIFFICULTY = "clinical"  # or "easy": large defects, balanced labels (perfusion.simulate)
METHODS = ("strip_rf", "tpd", "polar_logistic")  # of experiments.studies.perfusion_compare.METHODS
print(dict(n_train=N_TRAIN, n_test=N_TEST, folds=FOLDS, difficulty=DIFFICULTY))
""",
    ),
    (
        "md",
        "## Simulate and read studies\\n"
        "A study folder: `images/<id>.png` (stress and rest disks with a colour bar), "
        "`labels.csv` (label, territories, segments, sex, defect depth), and the true defect "
        "masks in `masks/`.",
    ),
    (
        "code",
        """
train_dir, test_dir = WORK / "train", WORK / "test"
simulate_dataset(train_dir, N_TRAIN, seed=0, difficulty=DIFFICULTY)
# another seed, another colormap and layout: studies the model never sees, drawn differently
simulate_dataset(test_dir, N_TEST, seed=1, difficulty=DIFFICULTY, colormap="hot", layout="stacked")
train = studies.read_study_folder(train_dir)
labels = np.array([s.label for s in train])
print(len(train), "studies:", {v: int((labels == v).sum()) for v in studies.LABELS})
""",
    ),
    (
        "code",
        """
# One study per label: the image as written, and the canonical stress / rest maps read from it.
picks = [int(np.flatnonzero(labels == v)[0]) for v in studies.LABELS]
fig, axes = plt.subplots(len(picks), 3, figsize=(10, 3.2 * len(picks)), squeeze=False)
for row, i in zip(axes, picks):
    s = train[i]
    row[0].imshow(plt.imread(s.path))
    row[0].set_title(f"{s.name}: {s.label} {'+'.join(s.territories)}", fontsize=9)
    row[1].imshow(s.stress_rgb)
    row[1].set_title("stress (canonical grid)", fontsize=9)
    row[2].imshow(s.rest_rgb)
    row[2].set_title("rest", fontsize=9)
    for ax in row:
        ax.axis("off")
plt.tight_layout()
plt.show()
""",
    ),
    ("md", "## The published strip/ring features"),
    (
        "code",
        """
X = features.study_feature_matrix(train)  # (N, 252): stress, rest, stress - rest
print("features:", X.shape)
# The features that best separate normal from abnormal studies (ANOVA F-test).
y_abnormal = (labels != "normal").astype(int)
f_score, _ = f_classif(X, y_abnormal)
top = np.argsort(np.nan_to_num(f_score))[::-1][:4]
fig, axes = plt.subplots(1, len(top), figsize=(4 * len(top), 3))
for ax, j in zip(axes, top):
    for c, v in enumerate(studies.LABELS):
        values = X[labels == v, j]
        ax.scatter(np.full(len(values), c) + np.linspace(-0.15, 0.15, len(values)), values, s=10)
    ax.set_xticks(range(len(studies.LABELS)), studies.LABELS)
    ax.set_title(f"{features.STUDY_FEATURE_NAMES[j]}\\nF = {f_score[j]:.0f}", fontsize=9)
plt.tight_layout()
plt.show()
""",
    ),
    ("md", "## Methods side by side (same folds, normal limits fitted inside each fold)"),
    (
        "code",
        """
result = perfusion_compare.compare_methods(
    perfusion_compare.StudyArrays.from_studies(train), METHODS, folds=FOLDS, n_boot=N_BOOT
)
print(perfusion_compare.comparison_markdown(result))
""",
    ),
    ("md", "## Fit the analysis model and analyse the held-out folder"),
    (
        "code",
        """
model_dir = WORK / "model"
meta = analyze.fit(train_dir, model_dir)
print(json.dumps(meta["fit"], indent=1))
model = analyze.load_model(model_dir)
report = analyze.analyze_path(
    model_dir, test_dir, WORK / "report.json", metrics_out=WORK / "metrics.json"
)
metrics = json.loads((WORK / "metrics.json").read_text())
for key in ("label_accuracy", "abnormal_accuracy", "ischemia_vs_infarction_accuracy",
            "territory_exact_accuracy", "uncertain_rate"):
    print(f"{key:>32}: {metrics[key]}")
print(f"{'segment F1':>32}: {metrics['segment']['f1']:.3f}")
print(f"{'calibration (ECE, normal vs abnormal)':>32}: {metrics['calibration']['abnormal']['ece']:.3f}")
""",
    ),
    (
        "code",
        """
test = studies.read_study_folder(test_dir)
study = next((s for s in test if s.label != "normal"), test[0])
reports, raw = analyze.analyze_arrays(model, [study])
report = {"file": os.path.basename(study.path), **reports[0]}
for key, value in report.items():
    print(f"{key:>18}: {value}")
print("truth:", study.label, "segments", list(study.segments), "territories", study.territories)

overlay = analyze.draw_overlay(study, report, raw["blackout"][0])
plt.figure(figsize=(9, 6))
plt.imshow(overlay)
plt.axis("off")
plt.title("blackout (darkened, outlined) and the 17-segment grid")
plt.show()
""",
    ),
]

LATENCY = [
    (
        "md",
        """
# Latency of the keypoint engine

Runs the latency harness of `experiments/bench_latency.py`
(`experiments/benchmarks/latency.py`) on this runtime: for each backbone, dtype, batch size
and backend, one uint8-in / keypoints-out engine (`xla`: an ahead-of-time compiled
executable; `onnxruntime`: the same network exported to ONNX), a warm-up, then timed runs
with the results fetched to the host.
*Model only* starts from frames already on the device; *end to end* starts from decoded
uint8 frames on the host and ends with gated keypoints on the host. Random weights of the
real architecture are enough for timing. The dotted line is the paper's 18 ms per frame (GPU).

On a CPU runtime the settings are small (resnet18, 128 px); on a GPU runtime the paper's
512 px input. The same from the command line:

    python experiments/bench_latency.py --backbones=resnet18,resnet34 --image_size=512 \\
        --batch_sizes=1,8,32,128 --dtypes=float32,bfloat16 --backend=xla,onnxruntime \\
        --onnxruntime_peer --out=bench.json --plot=latency.png
""",
    ),
    ("code", INSTALL),
    (
        "code",
        """
# The onnxruntime backend and peer need the project's `onnx` extra (onnx, onnxruntime).
if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "onnx", "onnxruntime"], check=True)
""",
    ),
    (
        "code",
        """
import importlib.util
import json
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FormatStrFormatter, FuncFormatter

from experiments.benchmarks import latency as bench
""",
    ),
    ("code", DEVICES),
    ("md", "## Parameters"),
    (
        "code",
        WORKDIR.format(name="latency")
        + """

BACKBONES, IMAGE_SIZE, BATCHES, DTYPES = ["resnet18"], 128, [1, 8, 32], ["float32"]
TIMING = {"min_time_s": 1.0, "min_runs": 10}  # timed runs per measurement, after warm-up
if ON_GPU:
    BACKBONES, IMAGE_SIZE = ["resnet18", "resnet34"], 512
    BATCHES, DTYPES = [1, 8, 32, 128], ["float32", "bfloat16"]
# Eager PyTorch of the same architecture as a baseline, when torch is installed (it is on Colab);
# onnxruntime as a second backend, and running torch's own ONNX export as the peer to match.
TORCH_EAGER = importlib.util.find_spec("torch") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
BACKENDS = ["xla", "onnxruntime"] if HAVE_ORT else ["xla"]
ORT_PEER = HAVE_ORT and TORCH_EAGER
if SMOKE:
    BACKBONES, IMAGE_SIZE, BATCHES, DTYPES = ["resnet_tiny"], 64, [1, 8], ["float32"]
    TIMING, TORCH_EAGER, ORT_PEER = {"min_time_s": 0.2, "min_runs": 5}, False, False
print(dict(backbones=BACKBONES, image_size=IMAGE_SIZE, batches=BATCHES, dtypes=DTYPES,
           backends=BACKENDS))  # fmt: skip
""",
    ),
    ("md", "## Run the harness"),
    (
        "code",
        """
result = bench.run_benchmark(
    backbones=BACKBONES,
    image_size=IMAGE_SIZE,
    batch_sizes=BATCHES,
    dtypes=DTYPES,
    torch_eager=TORCH_EAGER,
    timing=TIMING,
    backends=BACKENDS,
    onnxruntime_peer=ORT_PEER,
    out=WORK / "bench.json",  # rewritten after every row
)
print("device:", result["device"], "| jax", result["jax"], "|", result["date"])
for row in result["rows"]:
    line = f"{row['backbone']} {row['backend']} b={row['batch']}:"
    if "fraction_of_peak" in row:  # CPU: achieved vs a matmul's FLOP/s timed alongside
        line += f" {row['gflops_per_s']:.1f} GFLOP/s, {100 * row['fraction_of_peak']:.0f}% of peak"
    if "ratio_vs_onnxruntime" in row:  # below 1: faster than onnxruntime on torch's export
        line += f", time / onnxruntime peer {row['ratio_vs_onnxruntime']:.2f}"
    print(line)
""",
    ),
    (
        "code",
        """
# Per-frame latency (p50, with p90 and p99 as the bar) and throughput against the batch size.
# One colour per (backbone, backend, dtype); solid: end to end, dotted: model only, dashed: peers.
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
PCTS = ("p50", "p90", "p99")
lines = {}
for row in result["rows"]:
    lines.setdefault((row["backbone"], row["backend"], row["dtype"]), []).append(row)
for n, ((backbone, backend, dtype), rows) in enumerate(sorted(lines.items())):
    rows, color = sorted(rows, key=lambda r: r["batch"]), f"C{n}"
    b = np.array([r["batch"] for r in rows])
    for kind, style in (("end_to_end", "o-"), ("model", "s:")):
        p50, p90, p99 = (np.array([r[kind][f"{p}_ms"] for r in rows]) / b for p in PCTS)
        label = f"{backbone} {backend} {dtype} {kind.replace('_', ' ')}"
        ax1.errorbar(b, p50, yerr=[np.zeros_like(p50), p99 - p50], fmt=style, color=color,
                     capsize=3, label=label)  # fmt: skip
        ax1.plot(b, p90, "_", color=color, markersize=10)
        ax2.plot(b, 1e3 / p50, style, color=color, label=label)
    # The peers were timed beside every backend; draw them once, beside the xla rows.
    peers = (("torch_eager", "eager PyTorch", "x--"),
             ("onnxruntime_peer", "onnxruntime (torch export)", "^--"))  # fmt: skip
    for peer, name, style in peers:
        peer_rows = [r for r in rows if r.get(peer) and backend == "xla"]
        if peer_rows:
            tb = np.array([r["batch"] for r in peer_rows])
            t50 = np.array([r[peer]["p50_ms"] for r in peer_rows])
            ax1.plot(tb, t50 / tb, style, color=color, label=f"{backbone} {name}")
            ax2.plot(tb, tb * 1e3 / t50, style, color=color, label=f"{backbone} {name}")
# Plain numbers at 2x and 5x each power of ten as well: the axes often span one decade.
minor_labels = FuncFormatter(
    lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** np.floor(np.log10(v))) in (2, 5) else ""
)
ax1.axhline(bench.PAPER_MS_PER_FRAME, color="k", ls=":", label="paper: 18 ms/frame (GPU)")
ax1.set_ylabel("ms per frame (p50; bar to p99, tick at p90)")
ax2.set_ylabel("frames / s (p50)")
for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(minor_labels)
    ax.set_xlabel("batch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
fig.suptitle(f"{result['device']}, {IMAGE_SIZE} px input", fontsize=10)
plt.tight_layout()
plt.show()
""",
    ),
    (
        "code",
        """
# Where the time goes at the largest batch: each part compiled and timed alone.
for name, parts in result["profile"].items():
    shown = {k: v["p50_ms"] for k, v in parts.items() if k != "whole"}
    plt.figure(figsize=(6, 2.2))
    plt.barh(list(shown), list(shown.values()))
    plt.xlabel("ms per batch (p50)")
    plt.title(f"{name}: whole network {parts['whole']['p50_ms']:.2f} ms", fontsize=10)
    plt.tight_layout()
    plt.show()
""",
    ),
]

NOTEBOOKS = {
    "tavr_quickstart.ipynb": TAVR,
    "perfusion_quickstart.ipynb": PERFUSION,
    "latency.ipynb": LATENCY,
}


def build(name: str, spec: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook without outputs, with a Python 3 kernelspec (what Colab expects)."""
    nb = new_notebook(cells=_cells(spec, pathlib.Path(name).stem.split("_")[0]))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": [], "name": name}
    nb.metadata["accelerator"] = "GPU"
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name, spec in NOTEBOOKS.items():
        path = HERE / name
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(build(name, spec), str(tmp))
        tmp.replace(path)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

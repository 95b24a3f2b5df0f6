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
import importlib.util
import json
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

import tavr_jax
from tavr_jax.data.simulate import simulate_project
from tavr_jax.data.supervisely import read_project
from tavr_jax.evaluate import evaluate_project, tune_project
from tavr_jax.schema import get_schema
from tavr_jax.train import train_and_evaluate
from tavr_jax.visualize import contact_sheet, draw_keypoints, group_color

REPO_DIR = pathlib.Path(tavr_jax.__file__).resolve().parents[1]
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
BACKBONE, IMAGE_SIZE, BATCH, STEPS = "resnet18", 128, 16, 200
if ON_GPU:
    CASES, FRAMES, FRAME_SIZE = 40, 8, 256
    IMAGE_SIZE, BATCH, STEPS = 256, 32, 1500
if SMOKE:
    CASES, FRAMES, FRAME_SIZE = 6, 3, 96
    BACKBONE, IMAGE_SIZE, BATCH, STEPS = "resnet_tiny", 64, 8, 8
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
# A few frames of the first two cases, keypoints coloured by group.
shown = list(range(min(2 * FRAMES, len(project.frames))))
tiles = []
for i in shown:
    record = project.frames[i]
    tiles.append(
        draw_keypoints(
            project.load_image(i), record.coords, record.visibility, schema, labels=False
        )
    )
titles = [f"{project.frames[i].case_id[-2:]}/{project.frames[i].stage}" for i in shown]
sheet = contact_sheet(tiles, ncols=FRAMES, titles=titles)
plt.figure(figsize=(2.5 * FRAMES, 5.5))
plt.imshow(sheet)
plt.axis("off")
plt.title("simulated frames (case / stage), keypoints coloured by group")
handles = [
    Patch(color=np.array(group_color(g)) / 255, label=name)
    for g, name in enumerate(schema.group_names)
]
plt.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.show()
""",
    ),
    (
        "md",
        "## Train a little\nThe `runlocal` preset of `experiments/configs/tavr.py`, made smaller.",
    ),
    (
        "code",
        """
spec = importlib.util.spec_from_file_location(
    "tavr_config", REPO_DIR / "experiments" / "configs" / "tavr.py"
)
config_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_module)
config = config_module.get_config("runlocal")
config.schema = SCHEMA
config.backbone = BACKBONE
config.image_size = IMAGE_SIZE
config.batch_size = BATCH
config.num_steps = STEPS
config.warmup_steps = max(1, STEPS // 10)
config.eval_every = config.checkpoint_every = STEPS  # one validation and one checkpoint
config.log_every = max(1, STEPS // 10)
config.val_fraction = 0.2  # cases, not frames: the val and test cases are never trained on
config.test_fraction = 0.2

workdir = WORK / "train"
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
# Overlays of the test frames: truth as circles, predictions as crosses (with probabilities).
paths = sorted(overlays.glob("*.png"))[:4]
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

NOTEBOOKS = {"tavr_quickstart.ipynb": TAVR}


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

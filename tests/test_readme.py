"""The README's quick start, run as a user types it: every command between its quickstart
markers, in order, in a fresh folder, on tiny data.

Only sizes change: each command gets flags appended that shrink it (absl takes the last value
of a flag), so a README command that stops working fails here.
"""

import pathlib
import re
import shlex
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Appended to each launcher's command: tiny sizes, same steps.
TINY = {
    "make_tavr_data": ["--frames=3", "--size=64"],
    "build_tfds": ["--image_size=32"],
    "tavr_train": [
        "--config.backbone=resnet_tiny", "--config.image_size=32", "--config.batch_size=4",
        "--config.num_steps=2", "--config.optimizer.warmup_steps=1", "--config.eval_every=2",
        "--config.checkpoint_every=2",
    ],
    "tavr_export": ["--frame_size=64x64"],
    "make_perfusion_data": ["--size=32", "--disk_px=64"],
    "perfusion_fit": ["--size=32"],
}  # fmt: skip
# The training set's 150 patients become 10 (a validation and a test patient among them), the
# perfusion folders 20 and 6 studies.
SHRINK = {"--cases=150": "--cases=10", "--n=150": "--n=20", "--n=50": "--n=6"}


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- quickstart:begin -->\n```\n(.*?)```\n<!-- quickstart:end -->", text, re.S
    )
    assert block, "README.md lost its quickstart markers"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_the_readme_names_every_step_of_the_quick_start():
    launchers = [shlex.split(c)[1] for c in quickstart_commands() if c.startswith("python")]
    for step in ("make_tavr_data", "data_stats", "build_tfds", "tavr_train", "tavr_eval",
                 "tavr_infer", "tavr_export", "tavr_live", "perfusion_fit", "perfusion_analyze",
                 "serve"):  # fmt: skip
        assert f"experiments/{step}.py" in launchers, step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_quick_start_runs_as_written_on_tiny_data(tmp_path):
    port = _free_port()
    server = None
    # The commands run from the repository's root; here a fresh folder that sees its
    # experiments/ (launchers and configs), so what they write stays out of the checkout.
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    try:
        for line in quickstart_commands():
            for big, small in SHRINK.items():
                line = line.replace(big, small)
            background = line.endswith("&")
            words = shlex.split(line.rstrip("& "))
            if words[0] == "curl":  # the page's status, as curl would print it
                url = words[-1].replace(":8000", f":{port}")
                status = httpx.get(url, timeout=10).json()
                assert status["tavr"]["loaded"] and status["perfusion"]["loaded"], status
                continue
            script = pathlib.Path(words[1]).stem
            cmd = [sys.executable, *words[1:], *TINY.get(script, [])]
            if background:  # the server: started, then asked until it answers
                out = subprocess.PIPE
                server = subprocess.Popen([*cmd, f"--port={port}"], cwd=tmp_path, stdout=out,
                                          stderr=subprocess.STDOUT)  # fmt: skip
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=2)
                        break
                    except httpx.TransportError:
                        assert server.poll() is None, server.stdout.read().decode()[-2000:]
                        time.sleep(0.5)
                continue
            run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"{line}\n{run.stderr[-3000:]}"
            assert "Traceback" not in run.stderr, f"{line}\n{run.stderr[-3000:]}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    # What the commands promise is there.
    promised = ["data/stats.json", "runs/quick/test.json", "pred/cine/overlay.avi", "model.onnx",
                "pred/video/predictions.jsonl", "pred/onnx/predictions.jsonl", "live.jsonl",
                "perfusion_report.json", "models/perfusion/manifest.json"]  # fmt: skip
    for path in promised:
        assert (tmp_path / path).is_file(), path
    assert any((tmp_path / "preannotated").rglob("*.json"))

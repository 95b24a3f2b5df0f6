"""Training: sharded step numerics, exact resume after SIGKILL, NaN stop, multi-host."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import _train_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tavr_jax.run import workdir
from tavr_jax.run.checkpoint import CheckpointStore
from tavr_jax.training import train

WORKER = pathlib.Path(worker.__file__)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return worker.write_tiny_project(tmp_path_factory.mktemp("data") / "project")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Worker processes share compiled executables (with later runs too, via the session's
    # cache from conftest.py): only the first one pays for compilation.
    return jax.config.jax_compilation_cache_dir or tmp_path_factory.mktemp("jax_cache")


def _env(cache_dir, devices=1):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _train_cmd(workdir, project, steps):
    return [
        sys.executable,
        str(WORKER),
        "train",
        f"--workdir={workdir}",
        f"--data={project}",
        f"--steps={steps}",
        "--checkpoint_every=4",
    ]


def _final_state(workdir):
    with CheckpointStore(workdir, async_save=False, read_only=True) as store:
        state, data_state, step = store.restore(which="latest")
    return jax.device_get(state), data_state, step


def test_resume_after_sigkill_is_bit_exact(tmp_path, project, cache_dir):
    # One CPU device: XLA's in-process all-reduce over simulated devices is not bit
    # reproducible from run to run, with or without a restart.
    steps = 24
    env = _env(cache_dir)
    # The uninterrupted reference runs beside the victim: both are mostly single-threaded.
    ref_log = open(tmp_path / "ref.log", "w")  # noqa: SIM115 (closed after the run)
    reference = subprocess.Popen(
        _train_cmd(tmp_path / "ref", project, steps),
        env=env,
        stdout=ref_log,
        stderr=subprocess.STDOUT,
    )
    victim = tmp_path / "victim"
    proc = subprocess.Popen(
        _train_cmd(victim, project, steps),
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    for line in proc.stdout:
        if line.startswith("step 8: saved checkpoint"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = CheckpointStore(victim, read_only=True).latest_step()
    assert killed_at is not None and killed_at < steps  # the kill landed mid-run

    resumed = subprocess.run(
        _train_cmd(victim, project, steps), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference.wait(timeout=300)
    ref_log.close()
    assert reference.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert f"resumed from step {killed_at}" in resumed.stdout
    assert f"finished at step {steps}" in resumed.stdout

    ref = tmp_path / "ref"
    assert json.loads((ref / "config.json").read_text())["num_steps"] == steps
    assert list((ref / "events").glob("events.out.tfevents.*"))
    assert CheckpointStore(ref, read_only=True).best_step() == steps  # validated at the end
    ref_state, ref_data, ref_step = _final_state(ref)
    new_state, new_data, new_step = _final_state(victim)
    assert ref_step == new_step == steps
    assert ref_data == new_data
    assert jax.tree.structure(ref_state) == jax.tree.structure(new_state)
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit


@pytest.fixture
def fast_compile():
    # Compilation dominates these tests; optimisation level does not change what they check.
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _run_steps(mesh, config, batch, steps=2):
    model, schema = workdir.build_model(config)
    # Plain SGD: Adam's first step is lr * sign(g), which would amplify the rounding
    # differences of near-zero gradients into lr-sized ones.
    tx, lr_fn = optax.sgd(0.05), lambda opt_state, step: jnp.float32(0.05)
    state, sharding = train.create_train_state(config, model, tx, mesh)
    train_fn, _, batch_sharding = train.make_step_fns(
        model, tx, lr_fn, schema, config, mesh, sharding
    )
    initial = jax.device_get(state["params"])  # before the step donates the buffers
    global_batch = train.to_global(batch, batch_sharding)
    assert global_batch["image"].sharding.spec == P("data")
    assert len(global_batch["image"].sharding.device_set) == mesh.size
    history = []
    for _ in range(steps):
        state, metrics = train_fn(state, global_batch)
        history.append(jax.device_get(metrics))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    return initial, jax.device_get(state), history


def test_four_device_step_equals_one_device_step(fast_compile):
    assert jax.device_count() == 4  # tests/conftest.py
    config = worker.tiny_config()
    batch = worker.synthetic_batch(config.batch_size, config.image_size, 11)
    initial, one, hist1 = _run_steps(train.make_mesh(jax.devices()[:1]), config, batch)
    _, four, hist4 = _run_steps(train.make_mesh(), config, batch)
    assert int(one["step"]) == int(four["step"]) == 2
    for k in ("loss", "loss_group", "loss_keypoint", "loss_reg", "grad_norm"):
        np.testing.assert_allclose(hist1[-1][k], hist4[-1][k], rtol=1e-5, err_msg=k)
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(one["params"]), strict=True)
    )
    assert moved > 1e-3  # the steps did change the parameters
    for name in ("params", "batch_stats"):
        for a, b in zip(jax.tree.leaves(one[name]), jax.tree.leaves(four[name]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_training_steps_compile_with_the_engines_options(monkeypatch):
    # An option this XLA rejects proves that both jitted steps are compiled with whatever
    # `compiler_options` returns (on a CPU, the engine's: 1.2-1.7x faster training steps).
    monkeypatch.setattr(train, "compiler_options", lambda platform: {"xla_cpu_no_such": "1"})
    config = worker.tiny_config()
    mesh = train.make_mesh(jax.devices()[:1])
    model, schema = workdir.build_model(config)
    tx, lr_fn = optax.sgd(0.05), lambda opt_state, step: jnp.float32(0.05)
    state, sharding = train.create_train_state(config, model, tx, mesh)
    train_fn, eval_fn, batch_sharding = train.make_step_fns(
        model, tx, lr_fn, schema, config, mesh, sharding
    )
    batch = train.to_global(
        worker.synthetic_batch(config.batch_size, config.image_size, 11), batch_sharding
    )
    for fn in (train_fn, eval_fn):
        with pytest.raises(Exception, match="xla_cpu_no_such"):
            fn.lower(state, batch).compile()


def test_nan_loss_stops_with_the_step(tmp_path, project, monkeypatch, fast_compile):
    def poisoned(state, batch, **kw):
        # This test is about the loop, so a cheap step stands in for the network: it
        # advances the step and reports a loss that turns NaN at step 2.
        loss = jnp.where(state["step"] >= 2, jnp.nan, jnp.mean(batch["visible"]))
        return {**state, "step": state["step"] + 1}, {"loss": loss, "learning_rate": loss}

    monkeypatch.setattr(train, "train_step", poisoned)
    config = worker.tiny_config(num_steps=6, checkpoint_every=3)
    with pytest.raises(train.NaNLossError, match="at step 2 "):
        train.train_and_evaluate(config, tmp_path, project)
    # The state that produced NaN is never checkpointed.
    assert CheckpointStore(tmp_path, read_only=True).latest_step() is None
    assert not (tmp_path / "lock.json").exists()  # the workdir lock is released on errors
    assert json.loads((tmp_path / "config.json").read_text())["backbone"] == "resnet_tiny"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_their_own_rows_and_agree(tmp_path, project, cache_dir):
    steps = 2
    address = f"127.0.0.1:{_free_port()}"
    env = _env(cache_dir, devices=2)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "multihost",
                f"--coordinator={address}",
                "--num_processes=2",
                f"--process_id={i}",
                f"--data={project}",
                f"--steps={steps}",
                f"--out={tmp_path / f'p{i}.npz'}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    results = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    for r in results:
        assert int(r["device_count"]) == 4 and int(r["process_count"]) == 2
    # Each process read exactly its half of every global batch that one process reads.
    config = worker.tiny_config(augment=None)
    source, loader = worker.recording_loader(project, config)
    for _ in range(steps):
        next(loader)
    half = config.batch_size // 2
    global_batches = np.asarray(source.read).reshape(steps, config.batch_size)
    for i, r in enumerate(results):
        read = r["read"].reshape(steps, half)
        np.testing.assert_array_equal(read, global_batches[:, i * half : (i + 1) * half])
    names = [k for k in results[0].files if k.startswith("[")]
    assert len(names) > 10 and sorted(names) == sorted(
        k for k in results[1].files if k.startswith("[")
    )
    for k in names:
        np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=k)


def test_training_benchmark_times_the_step_training_compiles(project):
    from experiments.benchmarks import training as bench

    config = worker.tiny_config()
    result, state = bench.training_rate(config, steps=2, repeats=1, data_dir=project)
    assert result["images_per_s"] > 0 and result["images_per_s_pipeline"] > 0
    # The step's FLOPs, counted from the same jitted step that training runs (with its
    # compile options): positive, and a whole number of multiply-adds.
    assert result["flops_per_step"] > 0 and result["flops_per_step"] % 2 == 0
    # (a warm-up run + one timed run) x 2 steps, device-resident and pipeline-fed: 8 steps.
    assert int(jax.device_get(state["step"])) == 8


def _launch(workdir, project, cache_dir, *, steps, fail_save=None):
    cmd = [sys.executable, str(WORKER), "launch", f"--workdir={workdir}", f"--data={project}",
           f"--steps={steps}", "--checkpoint_every=3"]  # fmt: skip
    if fail_save:
        cmd.append(f"--fail_save={fail_save}")
    return subprocess.run(cmd, env=_env(cache_dir), capture_output=True, text=True, timeout=400)


def _noise(stderr: str) -> int:
    return stderr.count("Traceback") + stderr.count("Exception ignored")


def _log_lines(stderr: str) -> list[str]:
    # absl's one-line records (W..., E...), the progress bar's lines aside.
    return [line for line in stderr.splitlines() if line[:1] in "WEF" and line[1:5].isdigit()]


def test_launcher_disk_full_then_damaged_newest_step_one_line_each(tmp_path, project, cache_dir):
    w = tmp_path / "w"
    # Disk full at the last save: one line naming the folder and the cause, no partial folder,
    # the steps saved before restorable.
    full = _launch(w, project, cache_dir, steps=9, fail_save="ENOSPC@9")
    assert full.returncode == 1, full.stderr[-3000:]
    assert _noise(full.stderr) == 0, full.stderr[-3000:]
    assert f"error: {w}/checkpoints/latest/9: cannot save the checkpoint (disk full)" in full.stderr
    assert not list(w.glob("checkpoints/*/*.orbax-checkpoint-tmp"))
    with CheckpointStore(w, read_only=True) as store:
        assert store.latest_step() == 6
    # The newest step damaged, written before file digests existed (orbax's own read fails,
    # which orphans its other reads): the resume falls back to step 3 with one warning line
    # and exits without a traceback.
    newest = w / "checkpoints" / "latest" / "6"
    (newest / "_FILE_DIGESTS.json").unlink()
    manifest = newest / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    resumed = _launch(w, project, cache_dir, steps=9)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _noise(resumed.stderr) == 0, resumed.stderr[-3000:]
    fallback = [line for line in _log_lines(resumed.stderr) if "latest/6" in line]
    assert len(fallback) == 1 and "latest/3 instead" in fallback[0], resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout
    with CheckpointStore(w, read_only=True) as store:
        assert store.latest_step() == 9
    assert not (w / "lock.json").exists()


def test_launcher_refuses_a_workdir_another_run_holds(tmp_path, project, cache_dir):
    w = tmp_path / "w"
    hold = "import sys, time\nfrom tavr_jax.run.lock import WorkdirLock\n" + (
        "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(w)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _launch(w, project, cache_dir, steps=3)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert second.returncode == 1 and _noise(second.stderr) == 0, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"PID {holder.pid} on host {socket.gethostname()}" in errors[0]
    assert not (w / "config.json").exists()  # stopped before writing anything

"""The latency benchmark's torch peers: built per cell, compile time apart, failures as rows."""

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed: the peers are torch networks")

from experiments.benchmarks import torch_peers  # noqa: E402
from experiments.benchmarks.latency import torch_cell_peers  # noqa: E402
from tavr_jax.schema import get_schema  # noqa: E402

SCHEMA = get_schema("paper11")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_peer_takes_host_uint8_frames_and_returns_host_float32(dtype):
    torch_peers.new_cell()
    run, info = torch_peers.make_peer(
        "resnet_tiny",
        SCHEMA,
        32,
        batch=2,
        frame_size=32,
        dtype=dtype,
        mode="reduce-overhead",
        backend="eager",
    )
    assert info["device"] == "cpu" and info["backend"] == "eager" and info["compile_s"] > 0
    visibility, group, coords = run(np.zeros((2, 32, 32), np.uint8))
    assert visibility.shape == (2, SCHEMA.num_points) and group.shape == (2, SCHEMA.num_groups)
    assert coords.shape == (2, SCHEMA.num_points, 2)
    assert {a.dtype for a in (visibility, group, coords)} == {np.dtype(np.float32)}
    assert ((coords >= 0) & (coords <= 32)).all()  # sigmoid times the frame size
    with pytest.raises(ValueError, match="unknown torch mode"):
        torch_peers.make_peer("resnet_tiny", SCHEMA, 32, batch=1, frame_size=32,
                              dtype="float32", mode="default")  # fmt: skip


def test_cell_peers_keep_to_the_compile_budget_and_record_failures():
    modes = torch_peers.MODES
    spent = {}
    fns, info = torch_cell_peers(modes, "resnet_tiny", SCHEMA, 32, batch=1, frame_size=32,
                                 dtype="float32", backend="eager", budget_s=0.0, spent=spent,
                                 progress=lambda _: None)  # fmt: skip
    # eager is never held back; the compiled modes have no budget left from the start
    assert set(fns) == {"torch:eager"} and set(info) == {torch_peers.peer_name(m) for m in modes}
    for mode in ("max-autotune-no-cudagraphs", "reduce-overhead"):
        assert info[f"torch:{mode}"]["error"] == "compile budget of 0 s spent"
    fns, info = torch_cell_peers(["eager", "reduce-overhead"], "resnet_tiny", SCHEMA, 32,
                                 batch=1, frame_size=32, dtype="float16", backend="eager",
                                 progress=lambda _: None)  # fmt: skip
    assert fns == {}  # a dtype torch_peers does not run: each mode's error, no exception
    assert all(i["error"].startswith("ValueError: dtype must be") for i in info.values())

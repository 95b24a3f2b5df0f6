"""The timing helper of the benchmarks and the Winograd measurement: every contender runs once
per round, in order or shuffled."""

from cardiac_core.timing import time_interleaved


def _rounds(shuffle_seed):
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times = time_interleaved(
        fns, warmup=1, min_runs=8, max_runs=8, min_time_s=0.0, shuffle_seed=shuffle_seed
    )
    assert [len(t) for t in times] == [8, 8, 8]
    assert calls[:3] == [0, 1, 2]  # the warm-up
    return [tuple(calls[3 + 3 * r : 6 + 3 * r]) for r in range(8)]


def test_fixed_order_by_default_and_a_new_order_each_round_when_shuffled():
    assert _rounds(None) == [(0, 1, 2)] * 8
    shuffled = _rounds(0)
    assert all(sorted(r) == [0, 1, 2] for r in shuffled)  # each contender once per round
    assert len(set(shuffled)) > 1
    assert _rounds(0) == shuffled  # the seed fixes the orders

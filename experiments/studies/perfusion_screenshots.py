"""How well workstation screenshots read: the same simulated studies as clean exports and as
screenshots (perfusion.exports), read back by perfusion.studies and compared with the truth.
"""

from __future__ import annotations

import collections
import os
import re
import tempfile
import time

import numpy as np

from perfusion import geometry, simulate, studies


def _read_folder(root, size: int) -> tuple[dict, list, float]:
    """({name: mean absolute uptake error, masked fraction}, skipped, seconds per study)."""
    inner = geometry.polar_coords(size)[0] < 0.95
    skipped: list = []
    start = time.perf_counter()
    found = studies.read_study_folder(root, size=size, skipped=skipped)
    seconds = (time.perf_counter() - start) / max(len(found) + len(skipped), 1)
    out = {}
    for study in found:
        truth = np.load(os.path.join(root, "masks", f"{study.name}.npz"))
        error = np.mean(
            [
                np.abs(study.stress_uptake - truth["stress_uptake"])[inner].mean(),
                np.abs(study.rest_uptake - truth["rest_uptake"])[inner].mean(),
            ]
        )
        out[study.name] = (float(error), float(study.masked_fraction))
    return out, skipped, seconds


def _summary(values) -> dict:
    """mean, median, 90th percentile and max, or {} for no values."""
    v = np.asarray(values, float)
    if not len(v):
        return {}
    stats = {"mean": v.mean(), "median": np.median(v), "p90": np.percentile(v, 90), "max": v.max()}
    return {k: round(float(x), 4) for k, x in stats.items()}


def _reason(message: str) -> str:
    """A refusal's kind: its message without the file name and numbers."""
    text = message.split(": ", 1)[-1].split(";")[0]
    return re.sub(r"\d+(\.\d+)?%? ?(of )?", "", text).strip()


def measure(n: int, seed: int, *, size: int = 128, difficulty="clinical") -> dict:
    """Simulates n studies as clean PNG exports and as screenshots; reads both back."""
    result = {"n": n, "seed": seed, "size": size, "difficulty": str(difficulty)}
    with tempfile.TemporaryDirectory() as tmp:
        read = {}
        for style in ("plain", "screenshot"):
            root = os.path.join(tmp, style)
            simulate.simulate_dataset(
                root, n, seed, size=size, difficulty=difficulty, export_style=style
            )
            read[style], skipped, seconds = _read_folder(root, size)
            reasons = collections.Counter(_reason(r) for _, r in skipped)
            result[style] = {
                "read": len(read[style]),
                "refused": dict(reasons),
                "uptake_error": _summary([e for e, _ in read[style].values()]),
                "masked_fraction": _summary([m for _, m in read[style].values()]),
                "seconds_per_study": round(seconds, 3),
            }
        both = sorted(set(read["plain"]) & set(read["screenshot"]))
        result["both_read"] = {
            "n": len(both),
            "error_clean": _summary([read["plain"][k][0] for k in both]),
            "error_screenshot": _summary([read["screenshot"][k][0] for k in both]),
        }
    return result

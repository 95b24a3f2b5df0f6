import json
import pathlib
import subprocess
import sys

import numpy as np

from perfusion import analyze, classifiers, clinical_cv, fitting, simulate, studies

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_clinical_cv_fits_what_perfusion_fit_builds_and_skips_a_corrupt_study(tmp_path):
    data = tmp_path / "data"
    simulate.simulate_dataset(data, 30, seed=5, size=32, disk_px=64)
    rows = studies.read_labels(data / "labels.csv")
    broken = data / "images" / rows[4]["filename"]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated PNG
    out = tmp_path / "cv.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "perfusion_cv.py"),
            f"--data={data}",
            "--model=clinical",
            "--size=32",
            "--folds=3",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    kept = [r for r in rows if r["filename"] != rows[4]["filename"]]
    counts = {v: sum(r["label"] == v for r in kept) for v in studies.LABELS}
    assert f"read 29 studies, skipped 1: {counts}" in run.stdout
    assert f"skipped {rows[4]['filename']}: " in run.stderr
    assert "per-patient ROC AUC" in run.stdout and "Betancur 2018" in run.stdout
    result = json.loads(out.read_text())
    assert result["read"] == result["n"] == 29 and result["label_counts"] == counts
    assert [s["file"] for s in result["skipped"]] == [rows[4]["filename"]]
    assert result["fit_settings"]["operating_point"] == "sensitivity:0.95"
    m = result["evaluation"]
    assert m["n"] == 29 and 0.0 <= m["sensitivity"] <= 1.0
    for entry in (m["roc_auc"]["patient"], m["roc_auc"]["vessel"]["pooled"]):
        lo, hi = entry["ci95"]
        assert 0.5 <= lo <= entry["value"] <= hi <= 1.0  # separable even at 32 px
    assert set(m["roc_auc"]["vessel"]) == {"LAD", "LCX", "RCA", "pooled"}

    # The folds are those of the other perfusion_cv rows, and fold 1's reports are what the
    # model fitted on its training studies (as perfusion_fit fits them) reports.
    found, _, masks = clinical_cv.read_folder(data, size=32)
    y = np.array([s.label != "normal" for s in found], int)
    splits = classifiers.stratified_folds(y, 3, 0)
    fold_of = {int(i): f for f, (_, test) in enumerate(splits) for i in test}
    assert [r["fold"] for r in result["oof_reports"]] == [fold_of[i] for i in range(29)]
    train, test = splits[0]
    model = fitting.fit_model([found[i] for i in train], masks[train], size=32)
    assert model.operating_point.to_dict() == result["per_fold"][0]["operating_point"]
    reports, _ = analyze.analyze_arrays(model, [found[i] for i in test])
    for i, report in zip(test, reports, strict=True):
        got = result["oof_reports"][i]
        assert got == {"file": found[i].name, "fold": 0, **json.loads(json.dumps(report))}

    # The ROC figure of the docs from the out-of-fold reports, the calls marked.
    png = tmp_path / "roc.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "perfusion_roc.py"), f"--cv={out}",
         f"--out={png}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert png.stat().st_size > 10_000

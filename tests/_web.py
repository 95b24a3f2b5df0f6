"""What the web tests share: a tiny engine, a fitted perfusion model, a forced uncertain report."""

from perfusion import analyze, simulate
from tavr_jax import get_schema
from tavr_jax.infer.engine import KeypointEngine

SCHEMA = get_schema("paper11")


def tiny_engine() -> KeypointEngine:
    return KeypointEngine.random_init(SCHEMA, "resnet_tiny", 32, batch_size=4)


def fitted_perfusion(root):
    """(study folder, model): 15 simulated studies and a model fitted on them at 32 px."""
    simulate.simulate_dataset(root / "data", 15, seed=5, size=32, disk_px=64)
    analyze.fit(root / "data", root / "model", size=32)
    return root / "data", analyze.load_model(root / "model")


def report_uncertain(monkeypatch, reason: str) -> None:
    """Every perfusion report from now on says uncertain, for `reason`."""
    analyze_arrays = analyze.analyze_arrays

    def uncertain(model, studies_list):
        reports, raw = analyze_arrays(model, studies_list)
        return [{**r, "uncertain": True, "uncertain_reason": reason} for r in reports], raw

    monkeypatch.setattr(analyze, "analyze_arrays", uncertain)

"""R2I data synthesis (`zoomless synth`): crops -> questions -> verified answers -> full-image training data.

    cfg = load_synth_config("synth.yaml", {"roles.student.samples": 8})
    out_dir = run_synth(cfg)  # funnel.md / funnel.json, samples.parquet, easyr1.parquet, vision_opd.parquet
"""

from pathlib import Path

from zoomless.synth.config import SynthConfig, SynthConfigError, SynthError, load_synth_config, parse_overrides


def run_synth(cfg: SynthConfig) -> Path:
    """Run or resume the pipeline (zoomless.synth.runner.run_synth); returns the output folder."""
    # Imported here so that `python -m zoomless.synth.runner` does not find the runner already loaded.
    from zoomless.synth.runner import run_synth as run

    return run(cfg)


__all__ = ["SynthConfig", "SynthConfigError", "SynthError", "load_synth_config", "parse_overrides", "run_synth"]

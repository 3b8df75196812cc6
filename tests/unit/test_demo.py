"""The `make demo` story holds: a backbone pretrained on digits 0–4 transfers to digits 5–9."""

from pathlib import Path

import pytest

from finetune_trainer.demo import main, run_demo
from finetune_trainer.predict import Predictor

pytestmark = [pytest.mark.unit, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"


def test_finetune_beats_random_backbone_baseline(tmp_path):
    results = run_demo(EXAMPLES, tmp_path)
    finetune, baseline = results["finetune"][0], results["baseline"][0]
    assert results["pretrain"][0] > 0.9
    assert finetune > baseline, f"pretrained {finetune:.3f} vs random {baseline:.3f}"
    predictor = Predictor.load(tmp_path / "finetune")
    assert predictor.classes == ["5", "6", "7", "8", "9"]


def test_demo_cli_reuses_finished_steps_and_prints_the_table(tmp_path, capsys):
    run_demo(EXAMPLES, tmp_path)  # a second run finds every export finished and trains nothing
    assert main(["--examples", str(EXAMPLES), "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "transfer learning:" in out and "baseline" in out

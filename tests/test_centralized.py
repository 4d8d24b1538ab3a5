"""Centralized training end to end on the embedded data (tiny model, real Opacus, real files)."""

import json

import pytest

from shared_model.model import load_checkpoint
from shared_model.runners import CentralizedConfig, run_centralized

TINY = dict(image_size=32, cnn_channels=(8, 16), d_model=32, num_heads=2, ffn_dim=32, max_len=16, dropout=0.0)


def test_non_private_run_learns_and_writes_its_outputs(tmp_path):
    cfg = CentralizedConfig(train_size=400, test_size=40, epochs=3, batch_size=32, beam_size=1, meteor=False,
                            model=TINY)
    result = run_centralized(cfg, tmp_path, log=lambda s: None)
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0] * 0.8
    assert result["epsilon"] is None
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["CIDEr-D"] == pytest.approx(result["metrics"]["CIDEr-D"])
    assert set(saved["baseline"]) >= {"BLEU-4", "CIDEr-D", "ROUGE-L"}
    assert json.loads((tmp_path / "config.json").read_text())["centralized"]["epochs"] == 3
    model, vocab, meta = load_checkpoint(tmp_path / "checkpoint")
    assert meta["kind"] == "centralized" and model.config.d_model == 32


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_private_run_reports_epsilon_within_target(tmp_path, mode):
    cfg = CentralizedConfig(train_size=300, test_size=20, epochs=2, batch_size=50, beam_size=1, meteor=False,
                            dp=True, target_epsilon=4.0, target_delta=1e-4, max_physical_batch_size=16, model=TINY,
                            grad_sample_mode=mode)
    lines = []
    result = run_centralized(cfg, tmp_path, log=lines.append)
    assert any(f"grad-sample-mode {mode}" in line for line in lines)
    assert 0.5 * 4.0 < result["epsilon"] <= 4.0 * 1.01
    assert [h["epsilon"] for h in result["history"]] == sorted(h["epsilon"] for h in result["history"])
    assert result["noise_multiplier"] > 0
    assert any("epsilon" in line for line in lines)
    _, _, meta = load_checkpoint(tmp_path / "checkpoint")
    assert meta["epsilon"] == pytest.approx(result["epsilon"])


def test_fedcap_train_refuses_ghost_for_the_lstm_decoder_before_loading_data(tmp_path, capsys):
    from shared_model.runners.cli import main

    assert main(["train", "--dp", "--grad-sample-mode", "ghost", "--decoder", "lstm",
                 "--out", str(tmp_path / "run")]) == 2
    assert "grad-sample-mode 'ghost' cannot train the 'lstm' decoder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

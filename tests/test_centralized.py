"""Centralized training end to end on the embedded data (tiny model, real Opacus, real files)."""

import json

import pytest

from shared_model.model.checkpoint import load_checkpoint
from runners.centralized import CentralizedConfig, run_centralized

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
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["centralized"]["epochs"] == 3 and saved["private"] is False
    assert not {"accountant", "target_epsilon", "noise_multiplier", "max_grad_norm"} & set(saved["centralized"])
    assert saved["decoding"] == "greedy decoding (beam 1)" == result["decoding"]
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
    # config.json describes the private run: the embedded source and its size, the DP settings as run
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["private"] is True and saved["data"]["source"] == "embedded"
    assert saved["data"]["train_records"] == saved["centralized"]["train_size"] == 300
    settings = saved["centralized"]
    assert settings["accountant"] == "prv" and settings["grad_sample_mode"] == mode
    assert settings["noise_multiplier"] == pytest.approx(result["noise_multiplier"])  # as run, not the None asked
    assert CentralizedConfig(**settings).dp


def test_fedcap_train_refuses_ghost_for_the_lstm_decoder_before_loading_data(tmp_path, capsys):
    from runners.cli import main

    assert main(["train", "--dp", "--grad-sample-mode", "ghost", "--decoder", "lstm",
                 "--out", str(tmp_path / "run")]) == 2
    assert "grad-sample-mode 'ghost' cannot train the 'lstm' decoder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fedcap_train_on_several_folders_writes_the_run_that_happened(tmp_path, capsys):
    """Issue 23: `--data` takes several folders (trained on as one), and config.json says so: the
    folders, the records actually read, no embedded source or size, no DP settings for a
    non-private run; the score is printed with its decoding (the server's eval-beam-size)."""
    from deploy.site_folders import write_coco_folder
    from shared_model.data.synthetic import load_embedded
    from runners.flower_runtime import default_run_config
    from runners.cli import main
    from runners.sources import load_folder_splits

    a = write_coco_folder(load_embedded("train", 30, image_size=32), tmp_path / "site-a")
    b = write_coco_folder(load_embedded("train", 50, seed=1, image_size=32).subset(range(30, 50)), tmp_path / "site-b")
    out = tmp_path / "run"
    assert main(["train", "--data", str(a), str(b), "--epochs", "1", "--batch-size", "16", "--no-meteor",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    beam = default_run_config()["eval-beam-size"]
    assert f"scores on the held-out test split, greedy decoding (beam {beam}):" in printed and beam == 1
    splits = [load_folder_splits(f, "coco", image_size=64) for f in (a, b)]
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "centralized" and saved["private"] is False
    assert saved["data"] == {"source": "folders", "folders": [str(a), str(b)], "format": "coco",
                             "train_records": sum(len(t) for t, _ in splits),
                             "test_records": sum(len(t) for _, t in splits),
                             "vocabulary": "built from the training captions",
                             "vocabulary_size": saved["data"]["vocabulary_size"]}
    assert saved["data"]["train_records"] + saved["data"]["test_records"] == 50
    settings = saved["centralized"]
    assert not {"source", "train_size", "accountant", "target_epsilon", "target_delta"} & set(settings)
    assert settings["data"] == [str(a), str(b)] and settings["beam_size"] == beam
    assert CentralizedConfig(**settings).data == [str(a), str(b)]  # reproducible from it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoding"] == "greedy decoding (beam 1)" and metrics["epsilon"] is None
    _, _, meta = load_checkpoint(out / "checkpoint")
    assert meta["source"] == [str(a), str(b)] and meta["epsilon"] is None


def test_every_fedcap_option_with_a_default_shows_it_in_help():
    """Issue 23: `--help` of every subcommand shows each option's default; the CLI's beam defaults are
    the server's eval-beam-size (pyproject.toml), so one checkpoint has one score."""
    import argparse

    from runners.flower_runtime import default_run_config
    from runners.cli import build_parser

    def parsers(parser, name="fedcap"):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    seen = 0
    for name, parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and not isinstance(action, argparse._HelpAction):
                seen += 1
                shown = f"(default: {action.default})"
                assert shown in text, f"{name} {action.option_strings[0]}: no {shown} in its --help"
            if action.dest == "beam_size":
                assert action.default == default_run_config()["eval-beam-size"], name
    assert seen >= 40


def test_fedcap_train_takes_a_scenarios_source_and_records_it(tmp_path):
    """The shifted scenario's centralized baseline from the command line: its records and its vocabulary."""
    from runners.cli import main
    from shared_model.data.synthetic import synthetic_vocabulary

    assert main(["train", "--source", "shifted", "--train-size", "40", "--test-size", "8", "--epochs", "1",
                 "--image-size", "32", "--no-meteor", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["centralized"]["source"] == "shifted" == saved["data"]["source"]
    assert saved["data"]["vocabulary"] == "shifted (synthetic_vocabulary)"
    _, vocab, _ = load_checkpoint(tmp_path / "checkpoint")
    assert vocab == synthetic_vocabulary("shifted") != synthetic_vocabulary()

"""Issue 21: the server keeps the best round's checkpoint as checkpoints/BEST (round 0, the start,
included) beside LATEST, and the summary names it and the signal that picked it. Real checkpoints,
a real run folder and metrics rows as the ServerApp's evaluate_fn writes them; the scores are the
per-round server CIDEr-D of the issue's runs."""

import pytest
import torch

from conftest import tiny_config
from server.initial_model import initial_model, write_init_record
from server.outputs import NothingTrained, RunOutputs
from server.selection import best_round, selection_signal
from shared_model.privacy.reply import BUDGET_METRICS
from shared_model.data.synthetic import synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from runners.flower_runtime import default_run_config

RC = {**default_run_config(), "image-size": 32, "model-d-model": 32, "model-num-heads": 2, "model-ffn-dim": 32,
      "eval-beam-size": 1}


def tiny_model(seed: int) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(tiny_config(vocab_size=len(synthetic_vocabulary()), cnn_channels=(32, 64, 128), max_len=20))


def play(outputs: RunOutputs, scores: list[float], *, start_seed: int = 0) -> list[str]:
    """What the ServerApp does with round r scoring scores[r]: round 0 is the start (saved before
    round 1), every later round a trained one with its own weights; BEST after each. The BEST
    pointer after each round."""
    vocab, named = synthetic_vocabulary(), []
    for rnd, cider in enumerate(scores):
        outputs.log_round({"round": rnd, "BLEU-4": 0.1, "ROUGE-L": 0.3, "CIDEr-D": cider, "loss": 2.0,
                           "time": "2025-01-01T00:00:00Z"})
        if rnd > 0:
            outputs.save_checkpoint(rnd, tiny_model(start_seed + rnd), vocab)
        outputs.update_best()
        named.append((outputs.checkpoints / "BEST").read_text().strip())
    return named


def same_weights(a: Captioner, b: Captioner) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def pretrained(tmp_path):
    return save_checkpoint(tmp_path / "pretrained", tiny_model(0), synthetic_vocabulary(),
                           metadata={"kind": "pretrained"})


def test_a_run_whose_last_round_is_worse_than_round_0_returns_round_0_as_best(tmp_path, pretrained):
    outputs = RunOutputs(tmp_path / "run-1")
    init = initial_model({**RC, "init-from": str(pretrained)}, synthetic_vocabulary())
    write_init_record(outputs.dir, init)
    outputs.save_start(init)
    # public only 1.174; the epsilon-8 run's rounds all below it, its last (LATEST) the worst
    assert play(outputs, [1.174, 1.151, 1.113, 1.098], start_seed=10) == ["round-0000"] * 4
    assert (outputs.checkpoints / "LATEST").read_text() == "round-0003\n"
    best, _, meta = load_checkpoint(outputs.checkpoints / (outputs.checkpoints / "BEST").read_text().strip())
    assert same_weights(best, load_checkpoint(pretrained)[0])
    assert checkpoint_sha256(outputs.checkpoints / "round-0000") == init.sha256  # byte for byte the start
    assert meta == {"kind": "start", "server_round": 0, "source": "init-from", "checkpoint": str(pretrained),
                    "init-checkpoint": init.sha256}
    summary = outputs.write_summary(run_config=RC, strategy=NothingTrained([], trained_rounds=(1, 2, 3)),
                                    ended="completed", seconds=1.0,
                                    signal=selection_signal(RC, records=300)).read_text()
    assert "- BEST: round 0 (checkpoints/round-0000), CIDEr-D 1.1740" in summary
    assert f"- round 0, the start (init-from {pretrained}): CIDEr-D 1.1740 (this is BEST)" in summary
    assert "- last round, 3: CIDEr-D 1.0980 (BEST is +0.0760)" in summary
    assert outputs.best_line().startswith(f"BEST: {outputs.checkpoints / 'round-0000'} (round 0, server-side "
                                          f"validation CIDEr-D 1.1740)")


def test_best_moves_to_a_later_round_that_scores_higher_and_the_summary_names_it(tmp_path):
    outputs = RunOutputs(tmp_path / "run-2")
    init = initial_model(RC, synthetic_vocabulary())  # fresh
    write_init_record(outputs.dir, init)
    outputs.save_start(init)
    # the epsilon-8 server scores, then a round 4 that ties round 2: the earlier round keeps BEST
    named = play(outputs, [1.151, 1.113, 1.518, 1.099, 1.518])
    assert named == ["round-0000", "round-0000", "round-0002", "round-0002", "round-0002"]
    assert (outputs.checkpoints / "LATEST").read_text() == "round-0004\n"
    assert same_weights(load_checkpoint(outputs.checkpoints / "round-0002")[0], tiny_model(2))
    summary = outputs.write_summary(run_config=RC, strategy=NothingTrained([], trained_rounds=(1, 2, 3, 4)),
                                    ended="completed", seconds=1.0,
                                    signal=selection_signal(RC, records=300)).read_text()
    assert "## Best round: checkpoints/BEST" in summary
    assert "- BEST: round 2 (checkpoints/round-0002), CIDEr-D 1.5180" in summary
    assert ("- picked by: server-side validation CIDEr-D on 300 records of the server's evaluation set (the "
            "embedded scenario's test split), greedy decoding (eval-beam-size 1); higher is better, ties go to the earlier "
            "round") in summary
    assert "- round 0, the start (fresh): CIDEr-D 1.1510 (BEST is +0.3670)" in summary
    assert "- last round, 4: CIDEr-D 1.5180 (BEST is +0.0000)" in summary
    assert summary.index("## Best round") < summary.index("## Each site's budget")


@pytest.mark.parametrize("source", ["fresh", "init-from", "resume-from"])
def test_round_0000_is_the_model_the_federation_starts_from(tmp_path, pretrained, source):
    vocab = synthetic_vocabulary()
    if source == "resume-from":  # an earlier run's trained round
        earlier = RunOutputs(tmp_path / "run-1")
        rc = {**RC, "resume-from": str(earlier.save_checkpoint(2, tiny_model(7), vocab))}
    else:
        rc = {**RC, "init-from": str(pretrained)} if source == "init-from" else RC
    init = initial_model(rc, vocab)
    outputs = RunOutputs(tmp_path / "run-2")
    path = outputs.save_start(init)
    model, saved_vocab, meta = load_checkpoint(path)
    assert path.name == "round-0000" and saved_vocab == vocab and same_weights(model, init.model)
    assert meta["kind"] == "start" and meta["source"] == source and meta["server_round"] == 0
    assert not (outputs.checkpoints / "LATEST").exists()  # LATEST names trained rounds only
    assert outputs.update_best() is None and not (outputs.checkpoints / "BEST").exists()  # not scored yet
    if source == "resume-from":
        assert same_weights(model, tiny_model(7))


def test_best_round_is_the_highest_scored_candidate_and_the_earlier_on_a_tie():
    rows = [{"round": 0, "CIDEr-D": 1.0}, {"round": 1, "CIDEr-D": 1.2}, {"round": 2, "CIDEr-D": 1.2},
            {"round": 3, "CIDEr-D": float("nan")}, {"round": 4}, {"round": 5, "CIDEr-D": 9.0}]
    assert best_round(rows, candidates={0, 1, 2, 3, 4})["round"] == 1  # 5 has no checkpoint; nan, missing skipped
    assert best_round(rows, candidates={0, 3, 4})["round"] == 0
    assert best_round(rows, candidates={3, 4}) is None and best_round([], candidates={0}) is None


def test_nothing_scored_means_no_best_and_the_budget_table_leaves_unreported_keys_blank(tmp_path):
    outputs = RunOutputs(tmp_path / "run-3")
    strategy = NothingTrained([], site_budget={"site-0": {"epsilon": 1.5, "delta": 1e-5}})
    summary = outputs.write_summary(run_config=RC, strategy=strategy, ended="failed", seconds=1.0).read_text()
    assert "No round with a checkpoint was scored: no BEST." in summary
    assert "| site | " + " | ".join(BUDGET_METRICS) + " | budget exhausted |" in summary
    cells = ["1.5", "1e-05"] + [""] * (len(BUDGET_METRICS) - 2)  # epsilon, delta, then blanks
    assert "| site-0 | " + " | ".join(cells) + " |  |" in summary.splitlines()
    assert outputs.best_line() == "BEST: none (no round with a checkpoint was scored)"

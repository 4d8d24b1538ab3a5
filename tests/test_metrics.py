"""caption_metrics equals the COCO evaluation run by hand; the trivial baseline; input checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from shared_model.evaluation.metrics import METRIC_NAMES, caption_metrics, trivial_baseline_predictions

REFERENCES = {
    "1": ["A dog runs across the green grass.", "a brown dog running on a lawn", "The dog is running outside."],
    "2": ["Two people ride bicycles down a street.", "cyclists on a city road"],
    "3": ["A plate of food with broccoli and rice.", "a dinner plate with vegetables", "Broccoli, rice, and meat.",
          "food on a white plate"],
    "4": ["A cat sleeping on a couch.", "a grey cat asleep on the sofa"],
    "5": ["A red bus parked by the road.", "the bus is red", "A double-decker bus on a street."],
}
PREDICTIONS = {
    "1": "a dog running on the grass",
    "2": "a man riding a bike on a street",
    "3": "a plate of broccoli and rice",
    "4": "a dog sleeping on a couch",
    "5": "a red bus on the road",
}


def _child_pids() -> set[int]:
    """Live child processes of this process (Linux /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def _coco_evaluation(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """The COCO caption evaluation, step by step, straight from pycocoevalcap."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor  # pycocoevalcap's __del__ stops its Java process
    return {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3], "METEOR": meteor_score,
            "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see child processes")
def test_equals_direct_pycocoevalcap_and_closes_meteor() -> None:
    before = _child_pids()
    scores = caption_metrics(PREDICTIONS, REFERENCES)
    assert _child_pids() == before, "METEOR's Java process outlived caption_metrics"
    assert list(scores) == list(METRIC_NAMES)
    assert all(isinstance(v, float) for v in scores.values())
    assert scores == pytest.approx(_coco_evaluation(PREDICTIONS, REFERENCES), rel=1e-9, abs=1e-12)


def test_perfect_predictions_beat_wrong_ones() -> None:
    perfect = caption_metrics({i: refs[0] for i, refs in REFERENCES.items()}, REFERENCES, meteor=False)
    wrong = caption_metrics({i: "an empty kitchen with a fridge" for i in REFERENCES}, REFERENCES, meteor=False)
    assert "METEOR" not in perfect and set(perfect) == set(METRIC_NAMES) - {"METEOR"}
    assert all(perfect[name] > wrong[name] for name in perfect)
    assert perfect["BLEU-4"] == pytest.approx(1.0)


@pytest.mark.parametrize(("predictions", "references", "match"), [
    ({"1": "a dog"}, {"1": ["a dog"], "2": ["a bus"]}, r"1 missing \(e\.g\. \['2'\]\)"),
    ({"1": "a dog", "9": "a cat"}, {"1": ["a dog"]}, r"1 extra \(e\.g\. \['9'\]\)"),
    ({"1": "a dog"}, {"1": []}, "references for image '1' are empty"),
    ({}, {}, "non-empty"),
])
def test_bad_input_raises_value_error(predictions: dict, references: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        caption_metrics(predictions, references)


def test_references_must_be_lists_of_strings() -> None:
    with pytest.raises(TypeError, match="image '1'"):
        caption_metrics({"1": "a dog"}, {"1": "a dog"})


def test_trivial_baseline_picks_most_frequent_normalized_caption() -> None:
    train = ["A dog on grass.", "a cat", "a DOG on grass", "A cat!", "a dog, on grass", "..."]
    assert trivial_baseline_predictions(train, ["x", "y"]) == {"x": "a dog on grass", "y": "a dog on grass"}
    assert trivial_baseline_predictions(["b b", "a a", "b b", "a a"], ["x"]) == {"x": "a a"}  # tie: alphabetical
    with pytest.raises(ValueError, match="no non-empty caption"):
        trivial_baseline_predictions(["", "?!"], ["x"])

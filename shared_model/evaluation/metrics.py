"""Caption metrics, computed exactly as the COCO caption evaluation does (pycocoevalcap).

This is FedCap's only metrics code: both sides are PTB-tokenized, then scored with
pycocoevalcap's Bleu(4), Meteor, Rouge (ROUGE-L) and Cider (the CIDEr-D variant). METEOR and
the tokenizer run Java; METEOR's Java process is closed after every call.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from shared_model.data.vocab import tokenize

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


class _Meteor(Meteor):
    """pycocoevalcap's METEOR with an idempotent close().

    The parent's __del__ takes a lock that a failed compute_score leaves held, which would hang
    garbage collection; close() shuts the Java process down without that lock.
    """

    def close(self) -> None:
        proc = getattr(self, "meteor_p", None)  # absent if Java failed to start
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    __del__ = close


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                    meteor: bool = True) -> dict[str, float]:
    """Corpus-level BLEU-1..4, METEOR (unless meteor=False), ROUGE-L and CIDEr-D.

    predictions: image id -> one generated caption
    references:  image id -> one or more reference captions (the same ids as predictions)
    """
    _validate(predictions, references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": bleu[n - 1] for n in range(1, 5)}
    if meteor:
        scorer = _Meteor()
        try:
            scores["METEOR"] = scorer.compute_score(gts, res)[0]
        finally:
            scorer.close()
    scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    return {name: float(scores[name]) for name in METRIC_NAMES if name in scores}


def trivial_baseline_predictions(train_captions: Iterable[str], image_ids: Iterable[str]) -> dict[str, str]:
    """The most frequent normalized training caption, predicted for every image.

    Captions are normalized as lower-cased `tokenize` words joined by spaces; ties go to the
    alphabetically first caption, so the baseline does not depend on caption order.
    """
    counts = Counter(" ".join(words) for words in map(tokenize, train_captions) if words)
    if not counts:
        raise ValueError("train_captions has no non-empty caption")
    best = min(counts, key=lambda c: (-counts[c], c))
    return {image_id: best for image_id in image_ids}


def _validate(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    if not predictions or not references:
        raise ValueError(f"predictions and references must be non-empty, got {len(predictions)} predictions "
                         f"and {len(references)} references")
    missing = sorted(set(references) - set(predictions), key=str)
    extra = sorted(set(predictions) - set(references), key=str)
    if missing or extra:
        raise ValueError(f"prediction ids must equal reference ids: {len(missing)} missing (e.g. {missing[:5]}), "
                         f"{len(extra)} extra (e.g. {extra[:5]})")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image {image_id!r} must be a str, got {type(caption).__name__}")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references for image {image_id!r} must be a sequence of str, got {refs!r:.80}")
        if len(refs) == 0:
            raise ValueError(f"references for image {image_id!r} are empty")

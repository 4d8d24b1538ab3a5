"""FedCap ServerApp: FedAvg (or another strategy) wrapped by FedCapStrategy, server-side evaluation
every round on data the server owns, a checkpoint of the start (round 0) and of every trained
round, `checkpoints/BEST` (the best of them on that evaluation, server/selection.py) beside
`checkpoints/LATEST`, metrics and a run summary.
With `vocab-source = "private"`, a private vocabulary round comes first (server/private_vocab.py).

The run ends as failed (the ServerApp raises, so `flwr list` says finished:failed) when the run
config is invalid (before anything is written), when the starting checkpoint cannot be loaded, or
when a round trained fewer sites than `min-train-nodes` (after the summary is written)."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
log = logging.getLogger("flwr")  # Flower's handler prints it


class RunFailed(RuntimeError):
    """The run did not do what it was configured to do; the message says why."""


def _refuse(message: str) -> RunFailed:
    log.error("FedCap run refused: %s", message)
    return RunFailed(message)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from shared_model.run_settings import validate_run_config

    try:  # first thing: no folder, no model, no site contacted with a bad setting
        rc = validate_run_config(context.run_config)
    except (TypeError, ValueError) as e:
        raise _refuse(f"invalid run config: {e}") from None
    _run(grid, context, rc)


def _run(grid: Grid, context: Context, rc: dict) -> None:
    from shared_model.evaluation.evaluator import evaluate
    from shared_model.evaluation.gallery import Gallery
    from shared_model.run_folder import run_dir
    from shared_model.util import utc_now

    from .initial_model import initial_model, write_init_record
    from .outputs import NothingTrained, RunOutputs
    from .private_vocab import VocabRoundFailed, private_vocabulary
    from .selection import selection_signal
    from .server_data import server_eval_set, server_vocabulary
    from .strategy import FedCapStrategy, RoundFailed
    from .witness import FederationState, federation_state_path

    t0 = time.perf_counter()
    outputs = RunOutputs(run_dir(rc, context.run_id))
    outputs.save_run_config(dict(context.run_config))  # as resolved: every figure reproducible
    federation = FederationState(federation_state_path(rc))
    vocab_round = None
    if rc["vocab-source"] == "private":  # a DP vocabulary round before round 1 (server/private_vocab.py)
        try:
            vocab_round = private_vocabulary(grid, rc, run_id=str(context.run_id), witness=federation)
        except VocabRoundFailed as e:  # what each site said is in the summary; nothing trained
            outputs.write_summary(run_config=rc, strategy=NothingTrained(e.result.failures), ended=f"failed: {e}",
                                  seconds=time.perf_counter() - t0, extra=e.result.section())
            raise _refuse(str(e)) from None
        vocab_round.save(outputs.dir)
    try:  # fresh, resume-from or init-from (a pretrained checkpoint, its vocabulary included)
        # vocab: the sites' private release, operator-supplied or embedded; never pooled captions
        init = initial_model(rc, vocab_round.vocab if vocab_round else server_vocabulary(rc))
        model, vocab = init.model, init.vocab
        write_init_record(outputs.dir, init)
        eval_set = server_eval_set(rc, image_size=model.config.image_size)
    except (ValueError, TypeError, FileNotFoundError) as e:
        start = "resume-from" if rc["resume-from"] else "init-from" if rc["init-from"] else ""
        raise _refuse(f"{start + ': ' if start and not str(e).startswith(start) else ''}{e}") from None
    outputs.save_start(init)  # round-0000: a candidate for BEST, so a run never ends worse than it started
    signal = selection_signal(rc, records=len(eval_set))
    strategy = FedCapStrategy.from_run_config(rc, vocab.itos, on_evaluate=outputs.log_federated,
                                              witness=federation, run_id=str(context.run_id))
    if vocab_round is not None:  # the vocabulary round bound each node to its site and may have refusals
        strategy.node_site.update(vocab_round.node_site)
        strategy.failures += vocab_round.failures

    gallery = Gallery(eval_set, outputs.dir / "gallery", size=rc["gallery-size"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics, predictions = evaluate(model, eval_set, vocab, beam_size=rc["eval-beam-size"], meteor=False)
        gallery.observe(server_round, predictions)
        row = {"round": server_round, **metrics, "time": utc_now()}
        eps = list(strategy.site_epsilon.values())
        if eps:
            row["train-epsilon"] = sum(eps) / len(eps)
            row["max-site-epsilon"] = max(eps)
        outputs.log_round(row)
        if server_round in strategy.trained_rounds:  # never a checkpoint of a round that did not train
            outputs.save_checkpoint(server_round, model, vocab)
        outputs.update_best()
        log.info("round %d: CIDEr-D %.4f BLEU-4 %.4f loss %.4f", server_round, metrics["CIDEr-D"],
                 metrics["BLEU-4"], metrics["loss"])
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    ended, failure = "completed", None
    try:
        strategy.start(grid=grid,
                       initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rc["num-server-rounds"],
                       timeout=float(rc["round-timeout"]),
                       train_config=ConfigRecord({"server-round": 0, "init-checkpoint": init.sha256}),
                       evaluate_config=ConfigRecord(), evaluate_fn=evaluate_fn)
    except RoundFailed as e:
        ended, failure = f"failed: {e}", e
        log.error("%s", ended)
    summary = outputs.write_summary(run_config=rc, strategy=strategy, ended=ended, seconds=time.perf_counter() - t0,
                                    extra=[*(vocab_round.section() if vocab_round else []), *gallery.section()],
                                    signal=signal)
    print(f"FedCap run finished ({ended}); outputs: {outputs.dir}\nsummary: {summary}\n{outputs.best_line()}",
          flush=True)
    if failure is not None:
        raise RunFailed(f"{failure} (rounds trained: {len(strategy.trained_rounds)}; summary: {summary})") from None

"""FedCap ServerApp: FedAvg (or FedProx/FedAdam) wrapped by FedCapStrategy, server-side evaluation
every round on data the server owns, a checkpoint per round, metrics and a run summary."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
log = logging.getLogger("flwr")  # Flower's handler prints it


@app.main()
def main(grid: Grid, context: Context) -> None:
    from shared_model.evaluation import evaluate
    from shared_model.run_folder import run_dir

    from shared_model.util import utc_now

    from .initial_model import initial_model, write_init_record
    from .outputs import RunOutputs
    from .server_data import server_eval_set, server_vocabulary
    from .strategy import FedCapStrategy, NoSiteCanTrain, build_strategy

    t0 = time.perf_counter()
    rc = context.run_config
    outputs = RunOutputs(run_dir(rc, context.run_id))
    outputs.save_run_config(dict(rc))  # as resolved: every figure reproducible without today's pyproject
    # fresh, resume-from or init-from (a pretrained checkpoint, its vocabulary included)
    init = initial_model(rc, server_vocabulary(rc))  # vocab: operator-supplied or embedded, never pooled
    model, vocab = init.model, init.vocab
    write_init_record(outputs.dir, init)
    eval_set = server_eval_set(rc, image_size=model.config.image_size)
    strategy = FedCapStrategy(build_strategy(rc), vocab.itos, on_evaluate=outputs.log_federated)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics, _ = evaluate(model, eval_set, vocab, beam_size=int(rc["eval-beam-size"]), meteor=False)
        row = {"round": server_round, **metrics, "time": utc_now()}
        eps = list(strategy.site_epsilon.values())
        if eps:
            row["train-epsilon"] = sum(eps) / len(eps)
            row["max-site-epsilon"] = max(eps)
        outputs.log_round(row)
        if server_round > 0:
            outputs.save_checkpoint(server_round, model, vocab)
        log.info("round %d: CIDEr-D %.4f BLEU-4 %.4f loss %.4f", server_round, metrics["CIDEr-D"],
                 metrics["BLEU-4"], metrics["loss"])
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    ended = "completed"
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=int(rc["num-server-rounds"]), timeout=float(rc.get("round-timeout", 3600)),
                       train_config=ConfigRecord({"server-round": 0, "init-checkpoint": init.sha256}),
                       evaluate_config=ConfigRecord(),
                       evaluate_fn=evaluate_fn)
    except NoSiteCanTrain as e:
        ended = f"stopped early: {e}"
        log.warning("%s", ended)
    summary = outputs.write_summary(run_config=dict(rc), site_epsilon=strategy.site_epsilon, ended=ended,
                                    seconds=time.perf_counter() - t0)
    print(f"FedCap run finished ({ended}); outputs: {outputs.dir}\nsummary: {summary}", flush=True)

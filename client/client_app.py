"""FedCap ClientApp: thin handlers over client.trainer and shared_model (heavy imports inside)."""

from __future__ import annotations

import logging
from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
log = logging.getLogger("flwr")


def _model_and_vocab(msg: Message, context: Context):
    import torch

    from shared_model.data import Vocabulary
    from shared_model.model import Captioner, captioner_config_from_run_config

    config = msg.content["config"]
    vocab = Vocabulary.from_dict({"format": "fedcap-vocab/1", "itos": list(config["vocab"])})
    model = Captioner(captioner_config_from_run_config(context.run_config, vocab_size=len(vocab)))
    state = msg.content["arrays"].to_torch_state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"received weights do not fit the configured model: {e}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model, vocab, device


@app.train()
def train(msg: Message, context: Context) -> Message:
    from shared_model.model import model_state
    from shared_model.privacy import BudgetExhaustedError, PrivacyLedger

    from .settings import local_training, site_data, site_privacy, site_name, state_dir
    from .trainer import train_round

    rc, nc = context.run_config, context.node_config
    model, vocab, device = _model_and_vocab(msg, context)
    train_set, _ = site_data(rc, nc)
    privacy = site_privacy(rc, nc)
    ledger = PrivacyLedger(state_dir(rc, nc, context.run_id) / "ledger.jsonl")
    server_round = int(msg.content["config"]["server-round"])
    try:
        metrics = train_round(model=model, data=train_set, vocab=vocab,
                              training=replace(local_training(rc, msg.content["config"]),
                                               trainable=str(rc.get("trainable", "all"))),
                              privacy=privacy, ledger=ledger,
                              run_id=str(context.run_id), server_round=server_round,
                              num_rounds=int(rc["num-server-rounds"]), device=device, seed=int(rc["seed"]))
    except BudgetExhaustedError as e:
        log.warning("%s: %s", site_name(nc), e)
        content = RecordDict({
            "metrics": MetricRecord({"num-examples": 0, "budget-exhausted": 1, "epsilon": e.spent,
                                     "delta": e.target_delta}),
            "site": ConfigRecord({"name": site_name(nc), "budget-exhausted": str(e)}),
        })
        return Message(content=content, reply_to=msg)
    if privacy is None:  # same metric keys from every site, or Flower skips the aggregation
        metrics.update({"epsilon": float("inf"), "delta": 0.0, "noise-multiplier": 0.0, "sample-rate": 0.0,
                        "steps": 0})
    content = RecordDict({"arrays": ArrayRecord(model_state(model)), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": site_name(nc)})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from shared_model.evaluation import evaluate as evaluate_model

    from .settings import site_data, site_name

    model, vocab, device = _model_and_vocab(msg, context)
    _, held_out = site_data(context.run_config, context.node_config)
    metrics, _ = evaluate_model(model.to(device), held_out, vocab, beam_size=int(context.run_config["eval-beam-size"]),
                                device=device, meteor=False)
    metrics["num-examples"] = len(held_out)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       "site": ConfigRecord({"name": site_name(context.node_config)})}),
                   reply_to=msg)

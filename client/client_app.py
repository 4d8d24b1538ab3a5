"""FedCap ClientApp: thin handlers over client.trainer and shared_model (heavy imports inside): train,
evaluate, and the private vocabulary round (query.vocab)."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared_model.run_settings import validate_node_config

from .memory import release_memory

app = ClientApp(mods=[release_memory])
log = logging.getLogger("flwr")


def _model_and_vocab(msg: Message, context: Context):
    from shared_model.data.vocab import Vocabulary
    from shared_model.model.captioner import Captioner
    from shared_model.model.config import captioner_config_from_run_config

    config = msg.content["config"]
    vocab = Vocabulary.from_dict({"format": "fedcap-vocab/1", "itos": list(config["vocab"])})
    model = Captioner(captioner_config_from_run_config(context.run_config, vocab_size=len(vocab)))
    state = msg.content["arrays"].to_torch_state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"received weights do not fit the configured model: {e}") from None
    from shared_model.model.devices import resolve_device

    from .settings import node_setting

    return model, vocab, resolve_device(node_setting(context.node_config, "device"))


def _held_out_metrics(model, vocab, held_out, run_config, device) -> dict:
    """Caption metrics of `model` on the site's held-out split (never trained on), + num-examples."""
    from shared_model.evaluation.evaluator import evaluate as evaluate_model

    metrics, _ = evaluate_model(model.to(device), held_out, vocab, beam_size=int(run_config["eval-beam-size"]),
                                device=device, meteor=False)
    metrics["num-examples"] = len(held_out)
    return metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    nc = validate_node_config(context.node_config)  # a named error reply before anything else
    from .timing import Phases, cap_threads

    phases = Phases()
    from shared_model.model.checkpoint import model_state
    from shared_model.privacy.site_budget import BudgetExhaustedError

    from .settings import (data_cache_dir, ledger_is_ephemeral, local_training, mechanism_seed, run_request,
                           shares_held_out_metrics, site_budget, site_data, site_ledger, site_name,
                           warn_simulation_only, witnessed_head)
    from .trainer import train_round

    rc, config = context.run_config, msg.content["config"]
    name = site_name(nc)
    warn_simulation_only(rc, nc)
    model, vocab, device = _model_and_vocab(msg, context)
    budget = site_budget(rc, nc)
    ledger = site_ledger(rc, nc, context.run_id) if budget is not None else None
    ephemeral = ledger_is_ephemeral(rc, nc)
    site = {"name": name, "ledger-ephemeral": ephemeral}
    threads = cap_threads(nc)
    phases.mark("setup")
    train_set, held_out = site_data(rc, nc)
    phases.mark("data")
    # the received global model on the held-out split, before training: the server's federated
    # evaluation of the previous round, without a message (and a process start) of its own
    evaluation = None
    if config.get("evaluate-received", False) and shares_held_out_metrics(nc):
        evaluation = _held_out_metrics(model, vocab, held_out, rc, device)
    phases.mark("evaluate")
    evaluated = {"evaluate": MetricRecord(evaluation)} if evaluation is not None else {}
    try:
        metrics = train_round(model=model, data=train_set, vocab=vocab, training=local_training(rc, config),
                              budget=budget, ledger=ledger,
                              request=run_request(rc, config, context.run_id) if budget else None,
                              server_round=int(config["server-round"]),
                              witness=None if ephemeral else witnessed_head(config, name), device=device,
                              seed=mechanism_seed(rc, nc), feature_cache_dir=data_cache_dir(nc),
                              memory_limit=int(nc["memory-limit"] * 2**30) if "memory-limit" in nc else None)
    except BudgetExhaustedError as e:
        e.args = (f"site {name}: {e} (what next: docs/privacy.md, 'When the budget is spent')",)
        log.warning("%s", e)
        head, count = e.ledger_head
        content = RecordDict({
            "metrics": MetricRecord({"num-examples": 0, "budget-exhausted": 1, "epsilon": e.spent,
                                     "delta": e.target_delta, "target-epsilon": e.target_epsilon}),
            "site": ConfigRecord({**site, "budget-exhausted": str(e), "ledger-head": head, "ledger-lines": count}),
            **evaluated,
        })
        return Message(content=content, reply_to=msg)
    if budget is not None:
        site.update({"ledger-head": metrics.pop("ledger-head"), "ledger-lines": metrics.pop("ledger-lines")})
    phases.mark("train")
    arrays = ArrayRecord(model_state(model))
    phases.mark("reply")
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({**site, **phases.record(), "torch-threads": threads}), **evaluated})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    nc = validate_node_config(context.node_config)  # a named error reply before anything else
    from .settings import shares_held_out_metrics, site_data, site_name

    if not shares_held_out_metrics(nc):  # no epsilon covers them: say so, send none
        return Message(content=RecordDict({"site": ConfigRecord({"name": site_name(nc),
                                                                 "held-out-metrics": "withheld"})}), reply_to=msg)
    model, vocab, device = _model_and_vocab(msg, context)
    _, held_out = site_data(context.run_config, nc)
    metrics = _held_out_metrics(model, vocab, held_out, context.run_config, device)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       "site": ConfigRecord({"name": site_name(nc)})}),
                   reply_to=msg)


@app.query("vocab")
def vocab(msg: Message, context: Context) -> Message:
    """The private vocabulary round (message type "query.vocab", before round 1): the site releases
    DP word counts of its own records inside one ledger transaction (shared_model.privacy.vocab_release)."""
    nc = validate_node_config(context.node_config)
    from shared_model.privacy.ledger_lines import check_witness
    from shared_model.privacy.site_budget import BudgetExhaustedError
    from shared_model.privacy.vocab_release import release_vocabulary

    from shared_model.privacy.site_budget import public_epsilon

    from .settings import (ledger_is_ephemeral, mechanism_seed, site_budget, site_data, site_ledger, site_name,
                           vocab_release, witnessed_head)
    from .trainer import site_records

    rc, config = context.run_config, msg.content["config"]
    name, ephemeral = site_name(nc), ledger_is_ephemeral(rc, nc)
    budget = site_budget(rc, nc)
    if budget is None:
        raise ValueError("vocab-source 'private' needs the site's privacy budget, got dp = false")
    ledger = site_ledger(rc, nc, context.run_id)
    train_set, _ = site_data(rc, nc)
    site = {"name": name, "ledger-ephemeral": ephemeral}
    seed = mechanism_seed(rc, nc)  # None at a deployed site: the OS's entropy
    with ledger.transaction() as tx:
        ids, rows = site_records(train_set, ledger)  # each distinct record once, as DP-SGD samples them
        captions = [train_set.captions[r] for r in rows]
        budget.check_delta(len(ids))
        witness = None if ephemeral else witnessed_head(config, name)
        if witness is not None:
            check_witness(tx.records, head=witness[0], count=witness[1], path=ledger.path)
        try:
            released, line = release_vocabulary(tx=tx, record_ids=ids, captions=captions, budget=budget,
                                                release=vocab_release(config), run_id=str(context.run_id),
                                                run_epsilon=float(rc["run-epsilon"]), seed=seed)
        except BudgetExhaustedError as e:
            log.warning("%s: %s", name, e)
            head, count = e.ledger_head
            return Message(content=RecordDict({"site": ConfigRecord({**site, "refused": str(e), "ledger-head": head,
                                                                     "ledger-lines": count})}), reply_to=msg)
        head, count = tx.head
        events, extra = tx.all_events()
    words = sorted(released)
    # public values only: no count of the records counted or retired (the noisy word counts are the release)
    return Message(content=RecordDict({
        "vocab": ConfigRecord({"words": words, "counts": [float(released[w]) for w in words]}),
        "metrics": MetricRecord({"epsilon": public_epsilon(events, extra, budget), "threshold": line["threshold"]}),
        "site": ConfigRecord({**site, "ledger-head": head, "ledger-lines": count})}), reply_to=msg)

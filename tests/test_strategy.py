"""FedCapStrategy against real Flower Messages: malformed, impersonating and poisoned replies are
rejected for that site only, the round goes on with the valid ones, and too few valid replies fail
the round with every site's reason. The ledger head of every reply bound to its site (trained,
rejected or refused) is witnessed; an impersonator's never is."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from server.strategy import FedCapStrategy, NoSiteCanTrain, RoundFailed
from server.strategy_factory import build_strategy
from shared_model.privacy.reply import TRAIN_METRICS
from server.witness import FederationState
from shared_model.model.captioner import Captioner
from shared_model.privacy.federation_state import load_federation_state
from runners.flower_runtime import default_run_config

from conftest import tiny_config


@pytest.fixture(autouse=True)
def _server_task(flower_task):
    yield


@pytest.fixture(scope="module")
def global_model():
    return {k: v.numpy() for k, v in Captioner(tiny_config()).state_dict().items()}


def honest(global_model, seed, scale=1e-3):
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in global_model.items()}


# A value for every key a train reply may carry; metrics() sends those in TRAIN_METRICS.
REPORTED = {"num-examples": 100, "train-loss": 2.0, "epsilon": 1.0, "delta": 1e-5, "target-epsilon": 8.0,
            "epsilon-remaining": 7.0, "run-epsilon-granted": 2.0, "run-epsilon-spent": 1.0, "records-trained": 100,
            "records-retired": 0, "noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 10}


def metrics(**kw):
    base = {k: REPORTED[k] for k in TRAIN_METRICS}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def reply(node, arrays=None, *, site=None, metric=None, error=None, extra_site=None):
    """A train reply from `node`, as Flower delivers it to aggregate_train."""
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    instruction.metadata.__dict__["_message_id"] = f"ins-{node}"
    if error is not None:
        return Message(Error(code=2, reason=error), reply_to=instruction)
    content = RecordDict({"metrics": MetricRecord(metric if metric is not None else metrics()),
                          "site": ConfigRecord({"name": site or f"site-{node}", **(extra_site or {})})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content=content, reply_to=instruction)


def strategy(global_model, inner=None, **kw):
    s = FedCapStrategy(inner or FedAvg(min_train_nodes=2, min_available_nodes=2), ["a"], **kw)
    s.expect(ArrayRecord({k: Array(v) for k, v in global_model.items()}))
    return s


def aggregate(s, replies, server_round=1):
    arrays, _ = s.aggregate_train(server_round, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def mean(models):
    return {k: np.mean([m[k] for m in models], axis=0) for k in models[0]}


def distance(a, b):
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def malformed(global_model, case):
    """(arrays, metrics) of one bad reply: issue 12's cases."""
    ok = honest(global_model, 9)
    first = next(iter(ok))
    if case in ("float64", "float16", "complex64"):
        return {k: v.astype(case) for k, v in ok.items()}, metrics()
    if case == "norm 1e20":
        return {**ok, first: np.full_like(ok[first], 1e20)}, metrics()
    if case == "nan":
        return {**ok, first: np.full_like(ok[first], np.nan)}, metrics()
    if case == "shape":
        return {**ok, first: ok[first][..., :1].copy()}, metrics()
    if case == "missing array":
        return {k: v for k, v in ok.items() if k != first}, metrics()
    if case == "num-examples 1e12":
        return ok, metrics(**{"num-examples": 1e12})
    if case == "num-examples 0":
        return ok, metrics(**{"num-examples": 0})
    if case == "missing epsilon":
        return ok, metrics(epsilon=None)
    if case == "extra metric":
        return ok, metrics(**{"ledger-secret": 1.0})
    raise ValueError(case)


CASES = {"float64": "dtype", "float16": "dtype", "complex64": "dtype", "norm 1e20": "update-norm", "nan": "finite",
         "shape": "shape", "missing array": "arrays", "num-examples 1e12": "num-examples",
         "num-examples 0": "num-examples", "missing epsilon": "metric-keys", "extra metric": "metric-keys"}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_malformed_reply_is_rejected_for_that_site_only(global_model, case, caplog):
    s = strategy(global_model)
    good = [honest(global_model, 1), honest(global_model, 2)]
    arrays, metric = malformed(global_model, case)
    out = aggregate(s, [reply(1, good[0]), reply(2, good[1]), reply(3, arrays, metric=metric)])
    assert distance(out, mean(good)) < 1e-5  # the valid replies' mean: the bad one had no weight
    assert all(v.dtype == global_model[k].dtype for k, v in out.items())  # the model stays float32
    (failure,) = s.failures
    assert failure["site"] == "site-3" and failure["node"] == 3 and failure["kind"] == "rejected"
    assert failure["reason"].startswith(f"{CASES[case]} check failed")
    assert f"rejected the update of site-3 (node 3): check {CASES[case]}" in caplog.text
    assert set(s.site_budget) == {"site-1", "site-2"}  # nothing a rejected reply says is recorded
    assert s.trained_rounds == [1]


def test_metrics_are_bound_to_the_replying_node_not_to_the_name_it_claims(global_model):
    s = strategy(global_model)
    a, b = honest(global_model, 1), honest(global_model, 2)
    aggregate(s, [reply(1, a, site="site-1"), reply(2, b, site="site-2")])
    assert s.site_epsilon == {"site-1": 1.0, "site-2": 1.0}
    # node 3 claims site-1's name, reporting epsilon -5 for it; node 2 now claims site-1 too
    out = aggregate(s, [reply(1, a, site="site-1"), reply(2, b, site="site-1"),
                        reply(3, b, site="site-1", metric=metrics(epsilon=-5.0)), reply(4, b, site="site-4")], 2)
    assert s.site_epsilon == {"site-1": 1.0, "site-2": 1.0, "site-4": 1.0}
    assert {(f["node"], f["kind"]) for f in s.failures} == {(2, "rejected"), (3, "rejected")}
    assert all("site-name check failed" in f["reason"] for f in s.failures)
    assert distance(out, mean([a, b])) < 1e-5


def test_extra_site_keys_such_as_a_ledger_head_are_accepted(global_model):
    s = strategy(global_model)
    extra = {"ledger-head": "ab" * 32, "ledger-lines": 3}
    aggregate(s, [reply(1, honest(global_model, 1), extra_site=extra), reply(2, honest(global_model, 2))])
    assert s.failures == [] and s.trained_rounds == [1]


def test_the_expected_metric_keys_are_one_tuple_to_extend(global_model):
    keys = TRAIN_METRICS + ("time-train",)
    s = strategy(global_model, train_metrics=keys)
    aggregate(s, [reply(1, honest(global_model, 1), metric=metrics(**{"time-train": 9.0})),
                  reply(2, honest(global_model, 2), metric=metrics(**{"time-train": 8.0}))])
    assert s.failures == []


def test_too_few_valid_replies_fail_the_round_with_every_sites_reason(global_model):
    s = strategy(global_model)
    replies = [reply(1, honest(global_model, 1)),
               reply(2, error="<class 'ValueError'>:<'target-epsilon must be a number > 0, got -1.0'>"),
               reply(3, malformed(global_model, "float64")[0])]
    with pytest.raises(RoundFailed) as err:
        s.aggregate_train(1, replies)
    message = str(err.value)
    assert "1 site(s) trained, fewer than min-train-nodes 2" in message
    assert "node-2 error: error code 2: <class 'ValueError'>:<'target-epsilon must be a number > 0" in message
    assert "site-3 rejected: dtype check failed" in message
    assert s.trained_rounds == []


def test_every_site_refusing_for_budget_raises_no_site_can_train(global_model):
    s = strategy(global_model)
    refusal = {"num-examples": 0, "budget-exhausted": 1, "epsilon": 7.9, "delta": 1e-5}
    with pytest.raises(NoSiteCanTrain, match="0 site\\(s\\) trained"):
        s.aggregate_train(1, [reply(1, metric=refusal, extra_site={"budget-exhausted": "spent 7.9 of 8"}),
                              reply(2, metric=refusal)])
    assert s.exhausted == {"site-1", "site-2"} and s.site_budget["site-1"] == {"epsilon": 7.9, "delta": 1e-5}
    assert [f["kind"] for f in s.failures] == ["refused", "refused"] and "spent 7.9 of 8" in s.failures[0]["reason"]


def test_no_claimed_dataset_size_hands_one_site_the_model(global_model):
    s = strategy(global_model)  # examples-cap-ratio 4: a weight is at most 4 x the round's lower median
    small = [honest(global_model, i) for i in (1, 2)]
    big = honest(global_model, 3)
    out = aggregate(s, [reply(1, small[0]), reply(2, small[1]),
                        reply(3, big, metric=metrics(**{"num-examples": 9_000_000}))])
    expected = {k: (100 * small[0][k] + 100 * small[1][k] + 400 * big[k]) / 600 for k in big}
    assert distance(out, expected) < 1e-5


def poisoned(global_model):
    good = [honest(global_model, i) for i in range(1, 5)]
    bad = {k: global_model[k] + 1e6 * (good[0][k] - global_model[k]) for k in global_model}  # update x 1e6
    return good, bad


def test_a_poisoned_update_is_rejected_by_the_norm_bound_under_fedavg(global_model):
    good, bad = poisoned(global_model)
    s = strategy(global_model)
    out = aggregate(s, [reply(1, good[1]), reply(2, good[2]), reply(3, bad)])
    assert distance(out, mean(good[1:3])) < 1e-5
    (failure,) = s.failures
    assert failure["site"] == "site-3" and "update-norm check failed" in failure["reason"]
    assert "max-update-norm-ratio 10" in failure["reason"]
    # the absolute bound, alone
    s = strategy(global_model, max_update_norm=1.0, max_update_norm_ratio=0.0)
    aggregate(s, [reply(1, good[1]), reply(2, good[2]), reply(3, bad)])
    assert "> max-update-norm 1" in s.failures[0]["reason"]


@pytest.mark.parametrize("inner", [FedMedian(min_train_nodes=3), Krum(min_train_nodes=4, num_malicious_nodes=1),
                                   FedTrimmedAvg(min_train_nodes=3, beta=0.34)],
                         ids=["fedmedian", "krum", "fedtrimmedavg"])
def test_a_poisoned_update_leaves_the_model_useful_under_a_robust_strategy(global_model, inner):
    good, bad = poisoned(global_model)
    honest_update = distance(good[1], global_model)
    unprotected = strategy(global_model, FedAvg(min_train_nodes=3), max_update_norm_ratio=0.0)  # no norm bound
    ruined = aggregate(unprotected, [reply(1, bad), *(reply(i + 1, good[i]) for i in range(1, 4))])
    assert distance(ruined, global_model) > 1e4 * honest_update  # what plain FedAvg does with it
    s = strategy(global_model, inner, max_update_norm_ratio=0.0)  # the robust strategy alone
    out = aggregate(s, [reply(1, bad), *(reply(i + 1, good[i]) for i in range(1, 4))])
    assert s.failures == []
    assert distance(out, global_model) < 2 * honest_update  # within the honest updates' reach
    assert all(v.dtype == np.float32 for v in out.values())


def test_build_strategy_selects_the_robust_strategies():
    rc = {**default_run_config(), "min-train-nodes": 7, "min-available-nodes": 7}
    expected = {"fedavg": FedAvg, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
                "multikrum": MultiKrum, "bulyan": Bulyan}
    for name, cls in expected.items():
        built = build_strategy({**rc, "strategy": name, "num-malicious-nodes": 1})
        assert type(built) is cls and built.min_train_nodes == 7
    assert build_strategy({**rc, "strategy": "fedtrimmedavg", "trimmed-beta": 0.3}).beta == 0.3
    fedavgm = build_strategy({**rc, "strategy": "fedavgm", "server-momentum": 0.5})
    assert type(fedavgm) is FedAvgM and (fedavgm.server_learning_rate, fedavgm.server_momentum) == (1.0, 0.5)
    with pytest.raises(ValueError, match="min-train-nodes must be >= 4 x num-malicious-nodes \\+ 3 = 11 for bulyan, "
                                         "got 7"):
        build_strategy({**rc, "strategy": "bulyan", "num-malicious-nodes": 2})


def test_evaluation_inside_train_replies_reports_the_received_model(global_model):
    """evaluate-in-train: round r's train replies carry each site's held-out metrics of the model it
    received (round r-1's global model); evaluate messages go out only after the last round."""
    seen = []
    s = strategy(global_model, on_evaluate=lambda r, per_site, mean: seen.append((r, per_site, mean)),
                 evaluate_in_train=True, num_rounds=3)
    replies = []
    for node, (cider, n) in {1: (0.5, 10), 2: (1.0, 30)}.items():
        r = reply(node, honest(global_model, node))
        r.content["evaluate"] = MetricRecord({"CIDEr-D": cider, "num-examples": n})
        replies.append(r)
    forged = reply(3, honest(global_model, 3), site="site-1")  # claims node 1's site: rejected, not counted
    forged.content["evaluate"] = MetricRecord({"CIDEr-D": 99.0, "num-examples": 1000})
    s.aggregate_train(2, replies + [forged])
    (rnd, per_site, mean), = seen
    assert rnd == 1 and set(per_site) == {"site-1", "site-2"}
    assert mean["CIDEr-D"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert all("evaluate" not in r.content for r in replies)  # the inner strategy saw one MetricRecord each
    good, bad = reply(1, honest(global_model, 1)), reply(2, honest(global_model, 2))
    good.content["evaluate"] = MetricRecord({"CIDEr-D": 0.7, "num-examples": 10})
    bad.content["evaluate"] = MetricRecord({"CIDEr-D": 1.0, "num-examples": 0})
    s.aggregate_train(3, [good, bad])
    assert seen[-1][0] == 2 and set(seen[-1][1]) == {"site-1"}
    assert any(f["kind"] == "rejected" and "num-examples" in f["reason"] for f in s.failures)
    # no evaluate messages before the last round; a grid is only needed from the last round on
    assert s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid=None) == []
    assert s.configure_evaluate(2, ArrayRecord(), ConfigRecord(), grid=None) == []


def ledger(node, records):
    """A reply's ledger head: node `node`'s ledger at `records` lines."""
    return {"ledger-head": f"{node:02d}" * 32, "ledger-lines": records}


def witnessed(witness):
    """site -> (head, records), as saved in the federation state file."""
    return {s: (h["head"], h["lines"]) for s, h in load_federation_state(witness.path).items()}


@pytest.mark.parametrize("case", ["max-update-norm", "float64", "extra metric", "missing array"])
def test_a_rejected_reply_still_has_its_ledger_head_witnessed(global_model, case, tmp_path):
    """The site spent budget before its update was rejected: the spend's ledger line is witnessed,
    so a later rollback of its state dir is caught."""
    witness = FederationState(tmp_path / "federation-state.json")
    s = strategy(global_model, witness=witness, run_id="7", max_update_norm=1.0, max_update_norm_ratio=0.0)
    good, bad = poisoned(global_model)
    arrays, metric = (bad, metrics()) if case == "max-update-norm" else malformed(global_model, case)
    aggregate(s, [reply(1, good[1], extra_site=ledger(1, 3)), reply(2, good[2], extra_site=ledger(2, 3)),
                  reply(3, arrays, metric=metric, extra_site=ledger(3, 5))])
    (failure,) = s.failures
    assert failure["site"] == "site-3" and failure["kind"] == "rejected"
    assert ("update-norm check failed" in failure["reason"]) == (case == "max-update-norm")
    assert witnessed(witness) == {"site-1": (ledger(1, 3)["ledger-head"], 3),
                                  "site-2": (ledger(2, 3)["ledger-head"], 3),
                                  "site-3": (ledger(3, 5)["ledger-head"], 5)}
    assert witness.sites["site-3"]["run_id"] == "7" and witness.sites["site-3"]["server_round"] == 1
    assert set(s.site_budget) == {"site-1", "site-2"}  # its reported budget is still not recorded


def test_a_budget_refusal_has_its_ledger_head_witnessed_even_when_the_round_fails(global_model, tmp_path):
    witness = FederationState(tmp_path / "federation-state.json")
    s = strategy(global_model, witness=witness)
    refusal = {"num-examples": 0, "budget-exhausted": 1, "epsilon": 7.9, "delta": 1e-5}
    with pytest.raises(NoSiteCanTrain):
        s.aggregate_train(1, [reply(1, metric=refusal, extra_site={"budget-exhausted": "spent", **ledger(1, 4)}),
                              reply(2, metric=refusal, extra_site={"budget-exhausted": "spent", **ledger(2, 6)})])
    assert witnessed(witness) == {"site-1": (ledger(1, 4)["ledger-head"], 4),
                                  "site-2": (ledger(2, 6)["ledger-head"], 6)}


def test_a_node_claiming_another_sites_name_never_moves_its_witnessed_head(global_model, tmp_path, caplog):
    witness = FederationState(tmp_path / "federation-state.json")
    s = strategy(global_model, witness=witness)
    a, b = honest(global_model, 1), honest(global_model, 2)
    aggregate(s, [reply(1, a, extra_site=ledger(1, 3)), reply(2, b, extra_site=ledger(2, 3))])
    refusal = {"num-examples": 0, "budget-exhausted": 1, "epsilon": 7.9, "delta": 1e-5}
    # node 3 (new) and node 2 both claim site-1, with ledgers further along than site-1's; node 4
    # sends a malformed head; node 1 refuses with a shorter ledger than witnessed
    aggregate(s, [reply(1, a, metric=refusal, extra_site={"budget-exhausted": "spent", **ledger(1, 2)}),
                  reply(2, b, site="site-1", extra_site=ledger(2, 9)),
                  reply(3, b, site="site-1", extra_site=ledger(3, 9)),
                  reply(4, a, extra_site={"ledger-head": "x", "ledger-lines": "9"}),
                  reply(5, a, extra_site=ledger(5, 1)), reply(6, b, extra_site=ledger(6, 1))], 2)
    assert {(f["node"], f["kind"]) for f in s.failures} == {(1, "refused"), (2, "rejected"), (3, "rejected")}
    assert witnessed(witness) == {"site-1": (ledger(1, 3)["ledger-head"], 3),
                                  "site-2": (ledger(2, 3)["ledger-head"], 3),
                                  "site-5": (ledger(5, 1)["ledger-head"], 1),
                                  "site-6": (ledger(6, 1)["ledger-head"], 1)}
    assert "site-1 reported a ledger of 2 lines, fewer than the 3 witnessed: ignored" in caplog.text
    assert "site-4 reported a malformed ledger head 'x' of '9' lines: ignored" in caplog.text


class _VocabGrid:
    """A Grid whose nodes answer the private vocabulary query with the given (name, words) each
    (words None: a budget refusal), as the ClientApp's query.vocab handler shapes its reply."""

    def __init__(self, answers):
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            m.metadata.__dict__["_message_id"] = f"vocab-{node}"
            name, words = self.answers[node]
            head = {"ledger-head": f"head-{node}", "ledger-lines": 1}
            if words is None:
                content = RecordDict({"site": ConfigRecord({"name": name, "refused": "spent", **head})})
            else:
                content = RecordDict({
                    "site": ConfigRecord({"name": name, **head}),
                    "vocab": ConfigRecord({"words": words, "counts": [50.0] * len(words)}),
                    "metrics": MetricRecord({"threshold": 10.0,
                                             "epsilon": 1.0})})
            reply = Message(content=content, reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


VOCAB_RUN_CONFIG = {"min-train-nodes": 1, "min-available-nodes": 1, "node-wait-timeout": 5.0, "round-timeout": 5.0,
                    "vocab-noise-multiplier": 1.0, "vocab-max-words-per-record": 8, "vocab-delta": 1e-6}


def test_private_vocabulary_round_binds_each_site_name_to_one_node(tmp_path):
    """A node claiming a site name another node already gave is refused in the vocabulary round, as
    in training rounds: its words are not merged and the real site's witnessed head is kept."""
    from server.private_vocab import private_vocabulary

    witness = FederationState(tmp_path / "federation-state.json")
    grid = _VocabGrid({11: ("site-0", ["red", "circle"]), 12: ("site-0", ["poison"])})
    result = private_vocabulary(grid, VOCAB_RUN_CONFIG, run_id="1", witness=witness)
    assert result.node_site == {11: "site-0"}
    assert "poison" not in result.vocab.itos and "red" in result.vocab.itos
    assert [f["kind"] for f in result.failures] == ["site-name"] and result.failures[0]["node"] == 12
    assert "node 12 claims site 'site-0', which is node 11" in result.failures[0]["reason"]
    assert witness.sites["site-0"]["head"] == "head-11"


def test_private_vocabulary_round_witnesses_a_refusal(tmp_path):
    from server.private_vocab import private_vocabulary

    witness = FederationState(tmp_path / "federation-state.json")
    grid = _VocabGrid({11: ("site-0", ["red"]), 12: ("site-1", None)})
    result = private_vocabulary(grid, VOCAB_RUN_CONFIG, run_id="1", witness=witness)
    assert [(f["site"], f["kind"]) for f in result.failures] == [("site-1", "vocab-refused")]
    assert witnessed(witness) == {"site-0": ("head-11", 1), "site-1": ("head-12", 1)}

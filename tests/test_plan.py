"""Issue 21 (2): say before spending. The plan uses public quantities only and its warning fires
where issue 21's small sites handed back a model worse than their start."""

import math

import pytest

from shared_model.privacy.plan import site_plan
from shared_model.privacy.site_budget import RunRequest, SiteBudget
from runners.cli import main

BUDGET = SiteBudget(target_epsilon=8.0, target_delta=1e-5, accountant="rdp")
REQUEST = RunRequest(run_id="plan", run_epsilon=8.0, num_rounds=3, local_epochs=2, batch_size=128,
                     count_noise_multiplier=20.0)
ALL = 714_576  # the default captioner's parameters


def test_small_sites_training_everything_are_warned_and_the_main_job_is_not():
    small = site_plan(records=360, request=REQUEST, budget=BUDGET, trainable_parameters=ALL)
    # issue 21's arithmetic: noise 1.23 / 120 x sqrt(714,576) = 8.7 per step against a signal of at most 1
    assert small.expected_batch == 120 and small.steps == 18
    assert small.noise_to_signal == pytest.approx(small.noise_multiplier / 120 * math.sqrt(ALL))
    assert 8.4 < small.noise_to_signal < 9.0 and small.noise_dominates
    main_site = site_plan(records=1170, request=REQUEST, budget=BUDGET, trainable_parameters=ALL)
    assert not main_site.noise_dominates and main_site.run_noise_to_signal < small.run_noise_to_signal
    with pytest.raises(ValueError, match="records must be an int >= 1, got 0"):
        site_plan(records=0, request=REQUEST, budget=BUDGET, trainable_parameters=ALL)


def test_fedcap_plan_prints_each_site_and_the_levers(capsys):
    assert main(["plan", "--records", "1170", "360"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 1170 |" in out and "| 1 | 360 |" in out and "noise dominates" in out
    assert "warning: at sites [1]" in out and "train fewer parameters" in out and "fedcap rehearse" in out


def test_a_simulation_prints_its_sites_plan_before_spending(capsys):
    from simulations.run import main as simulate

    assert simulate(["--plan"]) == 0  # the main job's four sites, from their partitions' sizes
    out = capsys.readouterr().out
    assert "Each site's DP plan" in out and "| 2 | 439 |" in out and "| 3 | 966 |" in out

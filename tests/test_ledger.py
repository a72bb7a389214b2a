"""The privacy-budget ledger on a real SQLite file, including a writer killed mid-run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedshop.errors import FedShopError
from fedshop.storage.ledger import BudgetExceededError, Ledger


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")


def record(ledger: Ledger, run: str, step: int, epsilon: float, silo: str = "Germany") -> None:
    ledger.record(run, silo, "online-retail", step, epsilon, 1e-6, "customer", "rdp")


def test_spend_is_the_sum_over_runs_of_each_runs_largest_epsilon(ledger):
    ledger.set_budget("Germany", "online-retail", epsilon=10.0, delta=1e-5)
    for step, epsilon in enumerate([0.5, 1.0, 1.5], start=1):
        record(ledger, "run-a", step, epsilon)
    record(ledger, "run-b", 1, 2.0)
    balance = ledger.balance("Germany", "online-retail")
    assert balance.spent_epsilon == pytest.approx(3.5)
    assert balance.spent_delta == pytest.approx(2e-6)
    assert balance.runs == 2
    assert balance.remaining_epsilon == pytest.approx(6.5)
    assert ledger.balance("France", "online-retail").spent_epsilon == 0.0


def test_a_run_that_would_overspend_is_refused_before_training(ledger):
    ledger.set_budget("Germany", "online-retail", epsilon=4.0, delta=1e-5)
    record(ledger, "run-a", 1, 3.0)
    ledger.check("Germany", "online-retail", planned_epsilon=1.0, planned_delta=1e-6)
    with pytest.raises(BudgetExceededError, match=r"budget ε = 4 .*spent 3 in 1 runs"):
        ledger.check("Germany", "online-retail", planned_epsilon=1.5, planned_delta=1e-6)
    with pytest.raises(BudgetExceededError, match="no privacy budget is set"):
        ledger.check("France", "online-retail", planned_epsilon=0.1, planned_delta=1e-6)


def test_a_release_past_the_budget_is_not_recorded(ledger):
    ledger.set_budget("Germany", "online-retail", epsilon=2.0, delta=1e-5)
    record(ledger, "run-a", 1, 1.5)
    with pytest.raises(BudgetExceededError, match="nothing was released"):
        record(ledger, "run-a", 2, 2.5)
    assert ledger.balance("Germany", "online-retail").spent_epsilon == pytest.approx(1.5)


def test_reset_forgets_spends_but_keeps_budgets(ledger, tmp_path):
    ledger.set_budget("Germany", "online-retail", epsilon=2.0, delta=1e-5)
    record(ledger, "run-a", 1, 1.0)
    assert ledger.reset() == 1
    reopened = Ledger(ledger.url)  # the same file, a new connection: it persisted
    balance = reopened.balance("Germany", "online-retail")
    assert balance.spent_epsilon == 0.0 and balance.budget_epsilon == 2.0


def test_bad_budgets_and_unwritable_locations_are_clear_errors(ledger, tmp_path):
    with pytest.raises(FedShopError, match="needs ε > 0"):
        ledger.set_budget("Germany", "online-retail", epsilon=0.0, delta=1e-5)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FedShopError, match="cannot open the privacy ledger"):
        Ledger(f"sqlite:///{blocker / 'ledger.sqlite'}")


WRITER = """
import sys, time
from pathlib import Path
from fedshop.config import PrivacyConfig
from fedshop.privacy.dp import PrivacyGuard, make_plan

# The guard a training run uses: plan, check against the budget, then write-ahead per release.
config = PrivacyConfig(mode="user", noise_multiplier=2.0, budget=1000.0, ledger_url=sys.argv[1])
plan = make_plan(config, rounds=2_000, units=10_000, sampling_rate=0.01, steps_per_round=1)
guard = PrivacyGuard.open(plan, config, "online-retail", ("Germany",), run_id="run-killed")
released = Path(sys.argv[2])
for step in range(1, 2_000):
    epsilon = guard.release(step, plan.round_event)  # recorded first ...
    with released.open("a") as handle:  # ... then it leaves
        handle.write(f"{epsilon}\\n")
"""


def test_a_writer_killed_mid_run_never_leaves_the_ledger_under_counting(ledger, tmp_path):
    released = tmp_path / "released.txt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    process = subprocess.Popen(
        [sys.executable, str(script), ledger.url, str(released)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    deadline = time.monotonic() + 60
    while (not released.exists() or len(released.read_text().split()) < 20) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    releases = [float(x) for x in released.read_text().split()]
    assert len(releases) >= 20
    spent = Ledger(ledger.url).balance("Germany", "online-retail").spent_epsilon
    # Everything released was recorded first ...
    assert spent >= max(releases) - 1e-12
    # ... and at most one recorded release never went out (the next step's ε).
    assert spent <= max(releases) + 0.1


def test_a_resumed_run_continues_its_ledger_run_without_counting_twice(tmp_path):
    """A restarted server resumes its guard: the ledger shows the run's ε as if it had never
    stopped, even when the budget has no room for the whole plan counted a second time."""
    from fedshop.config import PrivacyConfig
    from fedshop.privacy.dp import PrivacyGuard, make_plan

    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    config = PrivacyConfig(mode="record", noise_multiplier=1.0, budget=0.0, ledger_url=url)
    plan = make_plan(config, rounds=4, units=1000, sampling_rate=0.05, steps_per_round=5,
                     count_noise_multiplier=10.0)  # fmt: skip
    Ledger(url).set_budget("A", "d", plan.planned_epsilon() * 1.2, 1e-3)
    guard = PrivacyGuard.open(plan, config, "d", ("A",))
    for round_number in (1, 2):
        guard.release(round_number, plan.round_event)
    after_two = guard.epsilon
    resumed = PrivacyGuard.resume(plan, config, "d", ("A",), guard.run_id, completed_rounds=2)
    assert resumed.epsilon == pytest.approx(after_two)
    assert Ledger(url).balance("A", "d").spent_epsilon == pytest.approx(after_two)
    for round_number in (3, 4):
        resumed.release(round_number, plan.round_event)
    assert resumed.epsilon == pytest.approx(plan.planned_epsilon(), rel=1e-6)
    assert Ledger(url).balance("A", "d").spent_epsilon == pytest.approx(resumed.epsilon)
    # Opening it afresh instead would have checked the whole plan against what is left.
    with pytest.raises(BudgetExceededError):
        PrivacyGuard.open(plan, config, "d", ("A",))

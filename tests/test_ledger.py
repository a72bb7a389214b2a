"""The privacy-budget ledger on a real SQLite file and a real PostgreSQL server, including a writer
killed mid-run and two processes spending one budget at once."""

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


def test_a_release_past_the_delta_budget_is_refused(ledger):
    ledger.set_budget("Germany", "online-retail", epsilon=10.0, delta=1e-5)
    ledger.record("run-a", "Germany", "online-retail", 1, 1.0, 6e-6, "customer", "rdp")
    # ε fits easily; δ does not: 6e-6 + 5e-6 > 1e-5.
    with pytest.raises(BudgetExceededError, match=r"δ = 1\.1e-05.*nothing was released"):
        ledger.record("run-b", "Germany", "online-retail", 1, 1.0, 5e-6, "customer", "rdp")
    ledger.record("run-b", "Germany", "online-retail", 1, 1.0, 4e-6, "customer", "rdp")
    balance = ledger.balance("Germany", "online-retail")
    assert balance.spent_delta == pytest.approx(1e-5) and balance.runs == 2


def test_privacy_ledger_json_prints_the_rows_alone(tmp_path):
    from typer.testing import CliRunner

    from fedshop.cli import app

    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger(url)
    ledger.set_budget("Germany", "online-retail", epsilon=4.0, delta=1e-5)
    ledger.record("run-a", "Germany", "online-retail", 1, 1.5, 2e-6, "customer", "rdp")
    ledger.record("run-b", "Germany", "online-retail", 1, 0.5, 2e-6, "customer", "rdp")
    # A spend whose budget was removed by hand: its budget fields are null.
    ledger.set_budget("France", "online-retail", epsilon=1.0, delta=1e-5)
    ledger.record("run-c", "France", "online-retail", 1, 0.25, 1e-6, "customer", "rdp")
    with sqlite3.connect(tmp_path / "ledger.sqlite") as connection:
        connection.execute("DELETE FROM budgets WHERE silo = 'France'")
    result = CliRunner().invoke(app, ["privacy", "ledger", "--json", "--ledger", url])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # the whole of stdout is the JSON
    assert rows == [
        {"silo": "France", "dataset": "online-retail", "budget_epsilon": None,
         "budget_delta": None, "spent_epsilon": 0.25, "spent_delta": 1e-6, "runs": 1,
         "remaining_epsilon": None},
        {"silo": "Germany", "dataset": "online-retail", "budget_epsilon": 4.0,
         "budget_delta": 1e-5, "spent_epsilon": 2.0, "spent_delta": 4e-6, "runs": 2,
         "remaining_epsilon": 2.0},
    ]  # fmt: skip


# Two of these spend one budget at once, each as its own run, in small steps, until refused. They
# start together (a "go" file) so that their check-and-spend steps overlap.
SPENDER = """
import json, sys, time
from pathlib import Path
from fedshop.storage.ledger import BudgetExceededError, Ledger

url, run, datasets, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
ledger = Ledger(url)
(folder / f"ready-{run}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
recorded = refused = 0
for dataset in range(datasets):
    for step in range(1, 100):
        try:
            ledger.record(run, "Germany", f"d{dataset}", step, 0.05 * step, 1e-9, "customer", "rdp")
        except BudgetExceededError:
            refused += 1
            break
        recorded += 1
print(json.dumps({"recorded": recorded, "refused": refused}))
"""


def spend_at_once(url: str, folder: Path, datasets: int = 20) -> None:
    """Run two SPENDERs against `url` at once; each budget is ε = 1 (20 steps of 0.05 in all)."""
    ledger = Ledger(url)
    for dataset in range(datasets):
        ledger.set_budget("Germany", f"d{dataset}", epsilon=1.0, delta=1e-5)
    script = folder / "spender.py"
    script.write_text(SPENDER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), url, run, str(datasets), str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for run in ("run-a", "run-b")
    ]
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{run}").exists() for run in ("run-a", "run-b")):
        assert time.monotonic() < deadline, "the spenders did not start"
        assert all(process.poll() is None for process in processes), "a spender stopped early"
        time.sleep(0.01)
    (folder / "go").touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    balances = [ledger.balance("Germany", f"d{dataset}") for dataset in range(datasets)]
    overspent = {
        b.dataset: round(b.spent_epsilon, 4) for b in balances if b.spent_epsilon > 1 + 1e-9
    }
    assert not overspent, f"budgets ε = 1 overspent: {overspent}"
    # Each process stopped at its first refusal on every dataset, and together they used each
    # budget to its end: 20 steps of 0.05, however the steps fell between them.
    assert [r["refused"] for r in results] == [datasets, datasets]
    assert sum(r["recorded"] for r in results) == 20 * datasets


def test_two_processes_spending_one_sqlite_budget_at_once_never_overspend_it(tmp_path):
    spend_at_once(f"sqlite:///{tmp_path / 'ledger.sqlite'}", tmp_path)


def _postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else where Debian installs them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    installed = [Path(f) for f in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    newest = max(installed, key=lambda f: [int(n) for n in f.parts[-3].split(".")], default=None)
    return newest.parent if newest else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port with one empty database; its URL.
    Skipped, with one line, where PostgreSQL or its driver is absent; CI (CI=true) fails instead."""
    missing = None
    binaries = _postgres_bin()
    if binaries is None:
        missing = "PostgreSQL's initdb is neither on PATH nor in /usr/lib/postgresql/*/bin"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = "the psycopg driver is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing, pytrace=False)
        pytest.skip(missing)
    # PostgreSQL refuses to run as root: as root, run it as the 'postgres' user (Debian's package
    # creates it), in a folder that user owns outside pytest's root-only tmp folder.
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(
                "running as root, with no 'postgres' user to run PostgreSQL as", pytrace=False
            )
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="fedshop-pg-"))
    if as_user:
        os.chown(folder, user.pw_uid, user.pw_gid)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data, log, pg_ctl = folder / "data", folder / "log", str(binaries / "pg_ctl")

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            server_log = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"{command[0]} failed: {done.stderr}{server_log}", pytrace=False)

    started = False
    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "fedshop", "--auth=trust", "--no-sync")
        # Sockets in our folder, TCP on loopback only; fsync off: a throwaway cluster.
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-o", options, "start")
        started = True
        from sqlalchemy import create_engine, text

        server = create_engine(
            f"postgresql+psycopg://fedshop@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT"
        )
        with server.connect() as connection:
            connection.execute(text("CREATE DATABASE ledger"))
        server.dispose()
        yield f"postgresql+psycopg://fedshop@127.0.0.1:{port}/ledger"
    finally:
        if started:
            run(pg_ctl, "-D", str(data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_spending_one_postgresql_budget_at_once_never_overspend_it(
    postgres_url, tmp_path
):
    spend_at_once(postgres_url, tmp_path)


def test_the_ledger_file_is_the_users_alone(tmp_path):
    import os
    import stat

    old = os.umask(0)
    try:
        Ledger(f"sqlite:///{tmp_path / 'sub' / 'ledger.sqlite'}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "ledger.sqlite").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o700


def test_two_dp_runs_started_at_once_never_overspend_one_budget(tmp_path):
    """Two real `fedshop train --dp record` processes against one ledger whose budget holds one run
    and a half: at least one of them is refused (at its opening check or at a round's write-ahead
    release) and the silos' spend never passes the budget."""
    import subprocess
    import sys

    ledger = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    config = tmp_path / "run.toml"
    config.write_text('methods = ["federated"]\n[model]\ndim = 8\n[data]\nmax_silos = 3\n')
    runs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "fedshop", "train", "--config", str(config), "--dp", "record",
                "--epsilon", "1", "--budget", "1.5", "--rounds", "3", "--ledger", ledger,
                "--out", str(tmp_path / f"run-{i}"),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    outcomes = [(run.wait(timeout=900), run.communicate()[1]) for run in runs]
    refused = [err for code, err in outcomes if code != 0]
    assert refused and all("budget" in err and "Traceback" not in err for err in refused), outcomes
    balances = Ledger(ledger).balances()
    assert balances and all(b.spent_epsilon <= b.budget_epsilon + 1e-9 for b in balances)

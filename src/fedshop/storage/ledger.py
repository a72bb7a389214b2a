"""The privacy-budget ledger: how much of each silo's ε budget each dataset has spent, persistently.

Rules that make it safe:
- **Write-ahead.** A run records the ε its next release will bring it to *before* the release leaves
  the silo (`record`). If the process dies between the two, the ledger over-counts; it can never
  under-count, because nothing is released that was not recorded first.
- **Refuse before training.** `check` compares the run's planned ε with what is left and raises
  `BudgetExceededError`, naming the budget, before any work starts.
- **Composition across runs** is the basic (additive) one: a silo's spend on a dataset is the sum over
  runs of each run's largest recorded ε (within a run the accountant composes more tightly). δ adds
  the same way. Conservative, and simple to audit.
- **Check-and-spend is atomic.** `record` reads the budget and the other runs' spends and writes the
  new spend in one transaction that concurrent spenders cannot interleave: on SQLite it begins with
  `BEGIN IMMEDIATE` (the database's write lock, taken before the reads; a second writer waits for it),
  on server databases it locks the budget row (`SELECT … FOR UPDATE`). It checks ε and δ.

Storage is SQLAlchemy: SQLite by default, any SQL URL works. The URL comes from the config, else
`$FEDSHOP_LEDGER_URL`, else a SQLite file in the user's data folder.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from fedshop.config import Environment
from fedshop.errors import FedShopError
from fedshop.storage.private_files import open_private_append


class BudgetExceededError(FedShopError):
    """A planned or recorded spend would take a silo past its privacy budget."""


class LedgerError(FedShopError):
    """The ledger database cannot be opened or written."""


_metadata = MetaData()
budgets = Table(
    "budgets",
    _metadata,
    Column("silo", String, primary_key=True),
    Column("dataset", String, primary_key=True),
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
)
spends = Table(
    "spends",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String, nullable=False),
    Column("silo", String, nullable=False),
    Column("dataset", String, nullable=False),
    # The run's cumulative (ε, δ) after the release this row announces.
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("step", Integer, nullable=False),
    Column("unit", String, nullable=False),
    Column("accountant", String, nullable=False),
    Column("recorded_at", DateTime, nullable=False),
    UniqueConstraint("run_id", "silo", "dataset", "step"),
)


def default_url(configured: str | None = None) -> str:
    """`configured` (not given: `$FEDSHOP_LEDGER_URL`), else a SQLite file in the user data folder."""
    if configured is None:
        configured = Environment.from_os().ledger_url
    if configured:
        return configured
    folder = Path(platformdirs.user_data_dir("fedshop"))
    return f"sqlite:///{folder / 'ledger.sqlite'}"


@dataclass(frozen=True)
class Balance:
    silo: str
    dataset: str
    budget_epsilon: float | None  # None: no budget set (nothing may be spent)
    budget_delta: float | None
    spent_epsilon: float
    spent_delta: float
    runs: int

    @property
    def remaining_epsilon(self) -> float:
        return (self.budget_epsilon or 0.0) - self.spent_epsilon


# How long a SQLite writer waits for another one's write lock before giving up, in seconds: far
# longer than one check-and-spend takes, so concurrent runs queue instead of failing.
SQLITE_BUSY_TIMEOUT = 60.0


def _sqlite_engine(url: str) -> Engine:
    """An engine whose transactions SQLAlchemy begins itself: reads with BEGIN, writes (a connection
    with the `fedshop_begin` option) with BEGIN IMMEDIATE. Python's sqlite3 would begin a transaction
    only at the first INSERT, after the budget was read, so two runs could both read "it fits" and
    both spend (SQLAlchemy's SQLite docs, "Enabling Non-Legacy SQLite Transactional Modes")."""
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, connection_record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        mode = connection.get_execution_options().get("fedshop_begin", "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())

    return engine


class Ledger:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        try:
            if self.url.startswith("sqlite:///"):
                # Who spent what on which data is private: the file is the user's alone.
                open_private_append(Path(self.url.removeprefix("sqlite:///"))).close()
            if make_url(self.url).get_backend_name() == "sqlite":
                self._engine: Engine = _sqlite_engine(self.url)
            else:
                self._engine = create_engine(self.url)
            # Writes hold SQLite's write lock from their first statement (elsewhere: no effect).
            self._writer = self._engine.execution_options(fedshop_begin="IMMEDIATE")
            with self._writer.begin() as connection:
                _metadata.create_all(connection)
        except (SQLAlchemyError, OSError) as exc:
            raise LedgerError(f"cannot open the privacy ledger at {self.url}: {exc}") from None

    def set_budget(self, silo: str, dataset: str, epsilon: float, delta: float) -> None:
        if epsilon <= 0 or not 0 < delta < 1:
            raise FedShopError(f"a budget needs ε > 0 and 0 < δ < 1, got ε={epsilon}, δ={delta}")
        with self._write() as connection:
            exists = connection.execute(
                select(budgets.c.silo).where(budgets.c.silo == silo, budgets.c.dataset == dataset)
            ).first()
            values = {"epsilon": epsilon, "delta": delta}
            if exists:
                connection.execute(
                    update(budgets)
                    .where(budgets.c.silo == silo, budgets.c.dataset == dataset)
                    .values(**values)
                )
            else:
                connection.execute(insert(budgets).values(silo=silo, dataset=dataset, **values))

    def balance(self, silo: str, dataset: str) -> Balance:
        with self._engine.connect() as connection:
            budget = connection.execute(
                select(budgets.c.epsilon, budgets.c.delta).where(
                    budgets.c.silo == silo, budgets.c.dataset == dataset
                )
            ).first()
            per_run = (
                select(
                    func.max(spends.c.epsilon).label("epsilon"),
                    func.max(spends.c.delta).label("delta"),
                )
                .where(spends.c.silo == silo, spends.c.dataset == dataset)
                .group_by(spends.c.run_id)
                .subquery()
            )
            spent = connection.execute(
                select(
                    func.coalesce(func.sum(per_run.c.epsilon), 0.0),
                    func.coalesce(func.sum(per_run.c.delta), 0.0),
                    func.count(),
                )
            ).one()
        return Balance(
            silo, dataset,
            budget[0] if budget else None, budget[1] if budget else None,
            float(spent[0]), float(spent[1]), int(spent[2]),
        )  # fmt: skip

    def balances(self) -> list[Balance]:
        with self._engine.connect() as connection:
            keys = connection.execute(
                select(budgets.c.silo, budgets.c.dataset).union(
                    select(spends.c.silo, spends.c.dataset)
                )
            ).all()
        return [self.balance(silo, dataset) for silo, dataset in sorted(keys)]

    def check(self, silo: str, dataset: str, planned_epsilon: float, planned_delta: float) -> None:
        """Refuse, before any training, a run whose planned spend does not fit the budget."""
        balance = self.balance(silo, dataset)
        if balance.budget_epsilon is None:
            raise BudgetExceededError(
                f"no privacy budget is set for silo '{silo}' on '{dataset}'; set one first"
            )
        if balance.spent_epsilon + planned_epsilon > balance.budget_epsilon + 1e-12:
            raise BudgetExceededError(
                f"silo '{silo}' on '{dataset}': the run plans ε = {planned_epsilon:.4g} but only "
                f"{balance.remaining_epsilon:.4g} of the budget ε = {balance.budget_epsilon:.4g} "
                f"is left (spent {balance.spent_epsilon:.4g} in {balance.runs} runs)"
            )
        if balance.spent_delta + planned_delta > (balance.budget_delta or 0.0) * (1 + 1e-9):
            raise BudgetExceededError(
                f"silo '{silo}' on '{dataset}': the run plans δ = {planned_delta:.3g} but the "
                f"budget δ = {balance.budget_delta:.3g} has {balance.spent_delta:.3g} spent"
            )

    def record(
        self,
        run_id: str,
        silo: str,
        dataset: str,
        step: int,
        epsilon: float,
        delta: float,
        unit: str,
        accountant: str,
    ) -> None:
        """Write ahead: the run's cumulative (ε, δ) once release `step` has happened. Call it, and
        let it commit, before the release leaves the silo; it refuses to pass the ε or δ budget.
        The check and the write are one transaction no concurrent `record` can interleave."""
        with self._write() as connection:
            # FOR UPDATE: on a server database, concurrent spenders of this budget queue here until
            # this transaction commits (SQLite already holds its write lock; it ignores the clause).
            budget = connection.execute(
                select(budgets.c.epsilon, budgets.c.delta)
                .where(budgets.c.silo == silo, budgets.c.dataset == dataset)
                .with_for_update()
            ).first()
            # Other runs count with their largest recorded (ε, δ); this run with the new value.
            others = connection.execute(
                select(spends.c.run_id, func.max(spends.c.epsilon), func.max(spends.c.delta))
                .where(
                    spends.c.silo == silo, spends.c.dataset == dataset, spends.c.run_id != run_id
                )
                .group_by(spends.c.run_id)
            ).all()
            total_epsilon = sum(row[1] for row in others) + epsilon
            total_delta = sum(row[2] for row in others) + delta
            if budget is None or total_epsilon > budget[0] + 1e-12:
                raise BudgetExceededError(
                    f"silo '{silo}' on '{dataset}': release {step} would bring the spend to "
                    f"ε = {total_epsilon:.4g}, over the budget "
                    f"ε = {budget[0] if budget else 0:.4g}; nothing was released"
                )
            if total_delta > budget[1] * (1 + 1e-9):
                raise BudgetExceededError(
                    f"silo '{silo}' on '{dataset}': release {step} would bring the spend to "
                    f"δ = {total_delta:.3g}, over the budget δ = {budget[1]:.3g}; "
                    "nothing was released"
                )
            key = (
                (spends.c.run_id == run_id) & (spends.c.silo == silo)
                & (spends.c.dataset == dataset) & (spends.c.step == step)
            )  # fmt: skip
            recorded = connection.execute(select(spends.c.epsilon).where(key)).first()
            if recorded is not None:
                # A resumed run writing a step again (it was written before a crash): keep the
                # larger value, so a spend is never lowered.
                if epsilon > recorded[0]:
                    connection.execute(update(spends).where(key).values(epsilon=epsilon))
                return
            connection.execute(
                insert(spends).values(
                    run_id=run_id, silo=silo, dataset=dataset, step=step, epsilon=epsilon,
                    delta=delta, unit=unit, accountant=accountant,
                    recorded_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
                )
            )  # fmt: skip

    def reset(self, silo: str | None = None, dataset: str | None = None) -> int:
        """Forget recorded spends (all, or one silo / dataset). Budgets stay. Returns rows removed."""
        statement = delete(spends)
        if silo is not None:
            statement = statement.where(spends.c.silo == silo)
        if dataset is not None:
            statement = statement.where(spends.c.dataset == dataset)
        with self._write() as connection:
            return connection.execute(statement).rowcount

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (on SQLite holding the write lock from its start), with database
        errors turned into one clear LedgerError."""
        try:
            with self._writer.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot write the privacy ledger at {self.url}: {exc}") from None

"""`fedshop` command line: parse, call, print. The work happens in the library."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedshop.config import RunConfig, load_config
from fedshop.errors import FedShopError
from fedshop.experiment import ExperimentResult, run_experiment
from fedshop.report.html import METHOD_LABELS

app = typer.Typer(
    help="FedShop: federated recommendation for shops that may not pool customer data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


class RichProgress:
    """One progress bar per method, drawn by rich."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def start(self, task: str, total: int) -> None:
        self.tasks[task] = self.progress.add_task(
            METHOD_LABELS.get(task, task), total=total, note=""
        )

    def advance(self, task: str, note: str = "") -> None:
        self.progress.update(self.tasks[task], advance=1, note=note)


def _default_out(name: str) -> Path:
    return Path("fedshop-runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _execute(config: RunConfig, out: Path, overwrite: bool) -> ExperimentResult:
    # Imported here so `fedshop --help` stays fast.
    from fedshop.data.registry import load_dataset
    from fedshop.report.run_folder import prepare_run_folder, write_run

    out = prepare_run_folder(out, overwrite)
    with console.status("Loading and cleaning data…"):
        dataset = load_dataset(config.data, seed=config.seed)
    report = dataset.report
    console.print(
        f"[bold]{dataset.name}[/]: {dataset.n_users:,} customers, {dataset.n_items:,} items, "
        f"{dataset.train.nnz:,} training interactions, {report['split']['test_users']:,} customers "
        f"with a test basket, {dataset.n_silos} silos  [dim]({report['source']})[/]"
    )
    columns = (
        TextColumn("{task.description:<30}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[note]}"),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        result = run_experiment(config, dataset, RichProgress(bars))
    write_run(out, result)
    _print_tables(result)
    console.print(f"\nRun folder: [bold]{out}[/]  ·  report: [bold]{out / 'report.html'}[/]")
    return result


def _print_tables(result: ExperimentResult) -> None:
    split = result.config.eval.split
    protocol = {"full": "Full-ranking", "sampled-100": "Sampled-100"}[result.config.eval.protocol]
    table = Table(
        title=f"{protocol} results on the {split} items, {result.config.federated.mode} "
        f"{result.config.model.name} (seed {result.config.seed})"
    )
    table.caption = "silo mean: unweighted mean over silos (small storefronts count as much as big)"
    table.add_column("method")
    for header in ("HR@10", "NDCG@10", "Recall@20", "silo mean\nHR@10", "customers", "time"):
        table.add_column(header, justify="right")
    for method, outcome in result.methods.items():
        s = outcome.summary
        table.add_row(
            method,
            f"{s['hr@10']:.4f}",
            f"{s['ndcg@10']:.4f}",
            f"{s['recall@20']:.4f}",
            f"{s['silo_mean_hr@10']:.4f}",
            f"{s['users']:,}",
            f"{outcome.seconds:.1f}s",
        )
    console.print(table)
    per_silo = Table(title="HR@10 per silo")
    per_silo.add_column("silo")
    per_silo.add_column("customers", justify="right")
    for method in result.methods:
        per_silo.add_column(method, justify="right")
    for silo in result.dataset.silo_names:
        cells = [result.methods[m].per_silo[silo] for m in result.methods]
        per_silo.add_row(
            silo,
            str(cells[0]["users"]),
            *(f"{c['hr@10']:.3f}" if c["users"] else "–" for c in cells),
        )
    console.print(per_silo)


OutOption = Annotated[
    Path | None, typer.Option("--out", help="Run folder (default: fedshop-runs/<name>-<time>).")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Write over a run folder that already holds a run.")
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
RoundsOption = Annotated[int | None, typer.Option("--rounds", help="Federated rounds.")]


@app.command()
def demo(
    out: OutOption = None,
    seed: SeedOption = None,
    rounds: RoundsOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train federated, centralized, local-only and popularity models on the embedded Online Retail
    data (one silo per country) and compare them."""
    config = load_config(
        overrides={"data.source": "embedded", "seed": seed, "federated.rounds": rounds}
    )
    _execute(config, out or _default_out("demo"), overwrite)


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML run configuration.")
    ] = None,
    out: OutOption = None,
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Data file (overrides data.path).")
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="Data folder (overrides data.data_dir).")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="online-retail, movielens-1m, movielens-100k, amazon-toys, amazon-beauty, "
            "amazon-sports or amazon-sequential (with --data-path).",
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="cross-silo (silos are clients) or cross-device (every shopper is a client).",
        ),
    ] = None,
    protocol: Annotated[
        str | None, typer.Option("--protocol", help="full (rank the catalogue) or sampled-100.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="mf-bpr, gmf or neumf.")] = None,
    clients_per_round: Annotated[
        int | None, typer.Option("--clients-per-round", help="Cross-device: shoppers per round.")
    ] = None,
    seed: SeedOption = None,
    rounds: RoundsOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Run one configured experiment (a TOML config, command-line options, or both)."""
    run_config = load_config(
        config,
        overrides={
            "data.dataset": dataset,
            "data.path": data_path,
            "data.data_dir": data_dir,
            "federated.mode": mode,
            "eval.protocol": protocol,
            "model.name": model,
            "federated.clients_per_round": clients_per_round,
            "seed": seed,
            "federated.rounds": rounds,
        },
    )
    name = config.stem if config else "train"
    _execute(run_config, out or _default_out(name), overwrite)


privacy_app = typer.Typer(
    help="The privacy-budget ledger: budgets per silo and dataset, and what runs have spent.",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy")
LedgerOption = Annotated[
    str | None,
    typer.Option("--ledger", help="SQL URL of the ledger (default: $FEDSHOP_LEDGER_URL, else a "
                 "SQLite file in the user data folder)."),
]  # fmt: skip


@privacy_app.command("ledger")
def privacy_ledger(ledger: LedgerOption = None) -> None:
    """Show every silo's budget, what it has spent, and what is left."""
    from fedshop.storage.ledger import Ledger

    book = Ledger(ledger)
    table = Table(title=f"Privacy ledger ({book.url})")
    for header in (
        "silo",
        "dataset",
        "budget ε",
        "budget δ",
        "spent ε",
        "spent δ",
        "left ε",
        "runs",
    ):
        table.add_column(header, justify="left" if header in ("silo", "dataset") else "right")
    for b in book.balances():
        table.add_row(
            b.silo, b.dataset,
            "–" if b.budget_epsilon is None else f"{b.budget_epsilon:.4g}",
            "–" if b.budget_delta is None else f"{b.budget_delta:.3g}",
            f"{b.spent_epsilon:.4g}", f"{b.spent_delta:.3g}", f"{b.remaining_epsilon:.4g}",
            str(b.runs),
        )  # fmt: skip
    console.print(table)


@privacy_app.command("budget")
def privacy_budget(
    silo: Annotated[str, typer.Argument(help="Silo name, as in the run reports.")],
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. online-retail.")],
    epsilon: Annotated[float, typer.Option("--epsilon", help="Total ε the silo may spend.")],
    delta: Annotated[float, typer.Option("--delta", help="Total δ the silo may spend.")],
    ledger: LedgerOption = None,
) -> None:
    """Set (or change) a silo's privacy budget on a dataset."""
    from fedshop.storage.ledger import Ledger

    Ledger(ledger).set_budget(silo, dataset, epsilon, delta)
    console.print(f"budget for {silo} on {dataset}: ε = {epsilon:g}, δ = {delta:g}")


@privacy_app.command("reset")
def privacy_reset(
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: recorded spends are forgotten for good.")
    ] = False,
    silo: Annotated[str | None, typer.Option("--silo", help="Only this silo.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset.")] = None,
    ledger: LedgerOption = None,
) -> None:
    """Forget recorded spends (budgets stay). Needs --yes."""
    from fedshop.storage.ledger import Ledger

    if not yes:
        raise FedShopError(
            "privacy reset forgets what was spent, which understates past privacy loss; "
            "pass --yes to confirm"
        )
    removed = Ledger(ledger).reset(silo, dataset)
    console.print(f"removed {removed} recorded spends")


def main() -> None:
    # Usage errors (unknown option, bad value type) are reported by typer itself with exit status 2;
    # our own user-facing errors become one line and status 2 as well.
    try:
        app()
    except FedShopError as exc:
        errors.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)

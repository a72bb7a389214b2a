"""`fedshop` command line: parse, call, print. The work happens in the library.

Only light modules are imported here: torch, dp-accounting, pandas, matplotlib and Flower are
imported inside the commands that use them, so `--help` and one-line errors answer at once.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from fedshop.choices import help_text
from fedshop.config import RETAIL_TASKS, RunConfig, load_config
from fedshop.deploy import check_deployable
from fedshop.errors import FedShopError

if TYPE_CHECKING:
    from fedshop.experiment import ExperimentResult


class InterruptError(Exception):
    """Ctrl-C during a command (see `main`)."""


class _Commands(TyperGroup):
    # Typer turns Ctrl-C into a silent exit 130; hand it to `main`, which says so.
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise InterruptError from None


app = typer.Typer(
    help="FedShop: federated recommendation for shops that may not pool customer data.",
    cls=_Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


class RichProgress:
    """One progress bar per method, drawn by rich."""

    def __init__(self, progress: Progress) -> None:
        from fedshop.report.html import METHOD_LABELS

        self.labels = METHOD_LABELS
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def start(self, task: str, total: int) -> None:
        self.tasks[task] = self.progress.add_task(self.labels.get(task, task), total=total, note="")

    def advance(self, task: str, note: str = "") -> None:
        self.progress.update(self.tasks[task], advance=1, note=note)


def _progress_bars(transient: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<30}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[note]}"),
        console=console,
        transient=transient,
    )


def _default_out(name: str) -> Path:
    return Path("fedshop-runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _execute(
    config: RunConfig,
    out: Path,
    overwrite: bool,
    then: Callable[[Path], None] | None = None,
) -> ExperimentResult:
    """Train, write the run folder, print the results; `then(folder)` runs before the closing
    serve command (the demo's cross-border insight)."""
    from fedshop.report.run_folder import run_folder, write_run

    with run_folder(out, overwrite) as folder:
        result = _train(config)
        write_run(folder, result)
    _print_tables(result)
    console.print(f"\nRun folder: [bold]{folder}[/]  ·  report: [bold]{folder / 'report.html'}[/]")
    if then is not None:
        then(folder)
    _print_serve_command(result, folder)
    return result


def _print_serve_command(result: ExperimentResult, folder: Path) -> None:
    """The one command that serves the run (a run without the federated model has none)."""
    import shlex

    if result.config.model.name == "sasrec":  # `fedshop serve` refuses sequential runs
        console.print("A sasrec run is not served: `fedshop serve` serves user-vector models.")
    elif "federated" in result.methods:
        console.print("Serve it to shoppers (API and page on this machine):", highlight=False)
        console.print(
            f"  fedshop serve {shlex.quote(str(folder))}", highlight=False, soft_wrap=True
        )


def _train(config: RunConfig) -> ExperimentResult:
    from fedshop.data.datasets import load_dataset
    from fedshop.experiment import run_experiment

    with console.status("Loading and cleaning data…"):
        dataset = load_dataset(
            config.data,
            seed=config.seed,
            cold_start=config.eval.cold_start,
            protocol=config.eval.protocol,
        )
    report = dataset.report
    console.print(
        f"[bold]{dataset.name}[/]: {dataset.n_users:,} customers, {dataset.n_items:,} items, "
        f"{dataset.train.nnz:,} training interactions, {report['split']['test_users']:,} customers "
        f"with a test basket, {dataset.n_silos} silos  [dim]({report['source']})[/]"
    )
    with _progress_bars(transient=False) as bars:
        return run_experiment(config, dataset, RichProgress(bars))


def _print_tables(result: ExperimentResult) -> None:
    split = result.config.eval.split
    protocol = {"full": "Full-ranking", "sampled-100": "Sampled-100", "ncf": "NCF-protocol"}[
        result.config.eval.protocol
    ]
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
    if result.cold_start is not None:
        _print_cold_start(result.cold_start.block())
    if result.cold_items is not None:
        _print_cold_items(result.cold_items)
    # Names whole at 80 columns: "United Kingdom" on one line, no method cut to "centraliz…" (the
    # outer border gives up the two columns that needs).
    per_silo = Table(title="HR@10 per silo", show_edge=False)
    per_silo.add_column("silo", no_wrap=True)
    per_silo.add_column("customers", justify="right")
    for method in result.methods:
        per_silo.add_column(method, justify="right", min_width=len(method))
    for silo in result.dataset.silo_names:
        cells = [result.methods[m].per_silo[silo] for m in result.methods]
        per_silo.add_row(
            silo,
            str(cells[0]["users"]),
            *(f"{c['hr@10']:.3f}" if c["users"] else "–" for c in cells),
        )
    console.print(per_silo)
    privacy = result.privacy
    if privacy.epsilon is not None:
        console.print(
            f"[bold]Privacy[/] (federated model): ε = {privacy.epsilon:.3g}, "
            f"δ = {privacy.delta:.3g} per {privacy.unit}; δ sized to {privacy.delta_population}; "
            f"{privacy.accountant} accountant, noise multiplier {privacy.noise_multiplier:.3g}, "
            f"clip {privacy.clip:g}",
            highlight=False,
        )
        if privacy.noise_seed_known:
            console.print(
                "[bold red]Not private: noise seed known.[/] The noise follows \\[privacy] "
                "noise_seed (in config.toml), so anyone who has it can remove the noise.",
                highlight=False,
            )
    elif "federated" in result.methods:
        console.print("[dim]No differential privacy in this run (ε = ∞); see --dp.[/]")
    protection = result.protection
    if protection.seconds_per_round is not None:
        console.print(
            f"[bold]Protection[/]: {protection.kind}, "
            f"{protection.seconds_per_round:.2f} s per round for all parties "
            f"({protection.latency_seconds_per_round:.2f} s added latency in a deployment), "
            f"{protection.bytes_per_client_per_round / 1e6:.2f} MB sent per client per round"
        )
    _print_communication(result)


def _print_communication(result) -> None:
    """One line: what the federated rounds cost on the wire (and on the simulated clock)."""
    from fedshop.report.communication import communication_block

    block = communication_block(result.history, result.config)
    if not block.get("bytes"):
        return
    moved = block["bytes"]
    clock = block.get("simulated_seconds")
    console.print(
        f"[bold]Communication[/] (federated, codec {block['codec']}, {block['schedule']}): "
        f"clients sent {moved['sent'] / 1e6:,.2f} MB and received {moved['received'] / 1e6:,.2f} MB"
        + (f"; {clock:,.0f} simulated seconds" if clock is not None else ""),
        highlight=False,
    )


def _print_cold_start(block: dict) -> None:
    """One line: new shoppers' HR@10 from a folded-in basket, against popularity and trained vectors."""
    fold, popular, trained = (block[m]["hr@10"] for m in ("fold_in", "popularity", "trained"))
    versus = block["ratios"]["fold_in/popularity"]["hr@10"]
    console.print(
        f"[bold]New shoppers[/] (cold start, {block['customers']:,} never seen in training): "
        f"HR@10 {fold:.4f} from a folded-in basket ({block['fold_in_ms_median']:.1f} ms), "
        f"{'–' if versus is None else f'{versus:.2f}×'} popularity ({popular:.4f}); "
        f"trained vectors {trained:.4f}",
        highlight=False,
    )


def _print_cold_items(block: dict) -> None:
    """New products: every method's metrics on the held-out items, among them and among all."""
    table = Table(
        title=f"New products: {block['held_out_items']:,} of {block['catalogue_items']:,} items "
        "held out of training, placed by their features"
    )
    table.caption = "among new: ranked among the held-out items; among all: the whole catalogue"
    table.add_column("method", no_wrap=True)
    for header in ("HR@10\namong new", "NDCG@10\namong new", "Recall@20\namong new",
                   "HR@10\namong all", "customers"):  # fmt: skip
        table.add_column(header, justify="right")
    for method, m in block["methods"].items():
        table.add_row(
            method, f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}", f"{m['recall@20']:.4f}",
            f"{m['among_all']['hr@10']:.4f}", f"{m['users']:,}",
        )  # fmt: skip
    console.print(table)


OutOption = Annotated[
    Path | None, typer.Option("--out", help="Run folder (default: fedshop-runs/<name>-<time>).")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Write over a run folder that already holds a run.")
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
RoundsOption = Annotated[int | None, typer.Option("--rounds", help="Federated rounds.")]


DpOption = Annotated[
    str | None,
    typer.Option("--dp", help=f"Differential privacy: {help_text('privacy_mode')}."),
]
EpsilonOption = Annotated[
    float | None, typer.Option("--epsilon", help="Target ε for the whole run (with --dp).")
]
DeltaOption = Annotated[
    float | None, typer.Option("--delta", help="δ (default 1/(10·n) for n protected units).")
]
NoiseOption = Annotated[
    float | None,
    typer.Option("--noise-multiplier", help="Fixed noise multiplier z instead of a target ε."),
]
ClipOption = Annotated[float | None, typer.Option("--clip", help="L2 bound on one unit's update.")]
NoiseSeedOption = Annotated[
    int | None,
    typer.Option("--noise-seed", help="Draw the DP noise reproducibly from this seed, for debugging "
                 "and tests. The run is then NOT private: anyone who knows the seed can remove the "
                 "noise (default: secret noise, different in every run)."),
]  # fmt: skip
BudgetOption = Annotated[
    float | None,
    typer.Option("--budget", help="ε budget per silo on this dataset in the privacy ledger (set "
                 "when the ledger has none; a run is refused if it would overspend it)."),
]  # fmt: skip
LedgerOption = Annotated[
    str | None,
    typer.Option("--ledger", help="SQL URL of the ledger (default: $FEDSHOP_LEDGER_URL, else a "
                 "SQLite file in the user data folder)."),
]  # fmt: skip


ProtectionOption = Annotated[
    str | None,
    typer.Option("--protection", help=f"How updates reach the server: {help_text('protection')}."),
]

ColdStartOption = Annotated[
    float | None,
    typer.Option("--cold-start", help="Fraction of the repeat customers held out of training as "
                 "new shoppers, served by basket fold-in (eval.cold_start; online-retail)."),
]  # fmt: skip

ColdItemsOption = Annotated[
    float | None,
    typer.Option("--cold-items", help="Fraction of the catalogue held out of training as new "
                 "products, placed by their features (eval.cold_items; --model mf-features)."),
]  # fmt: skip


def _privacy_overrides(
    dp, epsilon, delta, noise_multiplier, clip, budget, ledger, noise_seed=None
) -> dict:
    # A config file's 0 means "not set"; an option is set by being given (None when it is not), so a
    # given 0 is a mistake to refuse, not a quiet way to switch the setting off.
    for option, value in (("--epsilon", epsilon), ("--noise-multiplier", noise_multiplier),
                          ("--clip", clip)):  # fmt: skip
        if value is not None and not value > 0:
            raise FedShopError(f"{option} must be greater than 0, got {value:g}")
    if delta is not None and not 0 < delta < 1:
        raise FedShopError(f"--delta must be between 0 and 1 (exclusive), got {delta:g}")
    if budget is not None and budget < 0:
        raise FedShopError(f"--budget must be at least 0, got {budget:g}")
    if noise_seed is not None and noise_seed < 1:
        raise FedShopError(f"--noise-seed must be a positive integer, got {noise_seed}")
    return {
        "privacy.mode": dp,
        "privacy.epsilon": epsilon,
        "privacy.delta": delta,
        "privacy.noise_multiplier": noise_multiplier,
        "privacy.clip": clip,
        "privacy.budget": budget,
        "privacy.ledger_url": ledger,
        "privacy.noise_seed": noise_seed,
    }


@app.command()
def demo(
    out: OutOption = None,
    seed: SeedOption = None,
    rounds: RoundsOption = None,
    protection: ProtectionOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train federated, centralized, local-only and popularity models on the embedded Online Retail
    data (one silo per country) and compare them; 10% of the repeat customers are held out as new
    shoppers and served by basket fold-in."""
    config = load_config(
        overrides={
            "data.source": "embedded",
            "seed": seed,
            "federated.rounds": rounds,
            "protection.kind": protection,
            # New shoppers: 10% of the repeat customers held out, served by basket fold-in.
            "eval.cold_start": 0.1,
        }
    )
    _execute(config, out or _default_out("demo"), overwrite, then=_demo_insight)


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
            help=f"{help_text('dataset')}.",
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help=f"{help_text('federated_mode')}.",
        ),
    ] = None,
    protocol: Annotated[
        str | None, typer.Option("--protocol", help=f"{help_text('protocol')}.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help=f"{help_text('model')}.")] = None,
    clients_per_round: Annotated[
        int | None, typer.Option("--clients-per-round", help="Cross-device: shoppers per round.")
    ] = None,
    seed: SeedOption = None,
    rounds: RoundsOption = None,
    dp: DpOption = None,
    epsilon: EpsilonOption = None,
    delta: DeltaOption = None,
    noise_multiplier: NoiseOption = None,
    clip: ClipOption = None,
    budget: BudgetOption = None,
    ledger: LedgerOption = None,
    noise_seed: NoiseSeedOption = None,
    protection: ProtectionOption = None,
    cold_start: ColdStartOption = None,
    cold_items: ColdItemsOption = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="recommend (top-K products, the default), fit (will this size fit; "
            "--dataset renttherunway), demand (weekly demand and an inventory policy), returns "
            "(return risk) or fraud (fraudulent orders).",
        ),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Run one configured experiment (a TOML config, command-line options, or both)."""
    run_config = load_config(
        config,
        overrides={
            **_privacy_overrides(
                dp, epsilon, delta, noise_multiplier, clip, budget, ledger, noise_seed
            ),
            "data.dataset": dataset,
            "data.path": data_path,
            "data.data_dir": data_dir,
            "federated.mode": mode,
            "eval.protocol": protocol,
            "model.name": model,
            "federated.clients_per_round": clients_per_round,
            "seed": seed,
            "federated.rounds": rounds,
            "protection.kind": protection,
            "eval.cold_start": cold_start,
            "eval.cold_items": cold_items,
            "task": task,
        },
    )
    name = config.stem if config else "train"
    if run_config.task == "fit":
        _execute_fit(run_config, out or _default_out(f"{name}-fit"), overwrite)
        return
    if run_config.task in RETAIL_TASKS:
        _execute_retail(run_config, out or _default_out(f"{name}-{run_config.task}"), overwrite)
        return
    _execute(run_config, out or _default_out(name), overwrite)


def _deploy_dataset(config: RunConfig):
    """The data `deploy local` splits into silo files: a fit run's shops, a retail task's
    storefronts' table, or purchases."""
    if config.task == "fit":
        from fedshop.data.fit_feedback import load_fit_dataset

        return load_fit_dataset(config.data, config.fit, config.seed)
    if config.task in RETAIL_TASKS:
        from fedshop.retail_tasks import load_retail_dataset

        return load_retail_dataset(config)
    from fedshop.data.datasets import load_dataset

    return load_dataset(config.data, seed=config.seed, protocol=config.eval.protocol)


def _execute_fit(config: RunConfig, out: Path, overwrite: bool) -> None:
    """Train and report fit prediction (`--task fit`), write the run folder, print the tables."""
    from fedshop.data.fit_feedback import load_fit_dataset
    from fedshop.fit_experiment import run_fit_experiment
    from fedshop.report.fit_run import FIT_METHOD_LABELS, write_fit_run
    from fedshop.report.run_folder import run_folder

    with run_folder(out, overwrite) as folder:
        with console.status("Loading and cleaning data…"):
            dataset = load_fit_dataset(config.data, config.fit, config.seed)
        report = dataset.report
        console.print(
            f"[bold]{dataset.name}[/]: {dataset.n_users:,} shoppers, {dataset.n_products:,} "
            f"products (item × size), {len(dataset.pooled('train')):,} training records, "
            f"{len(dataset.pooled(config.eval.split)):,} held out, {dataset.n_silos} shops by "
            f"{config.fit.silos}  [dim]({report['source']})[/]"
        )
        with _progress_bars(transient=False) as bars:
            progress = RichProgress(bars)
            progress.labels = {**progress.labels, **FIT_METHOD_LABELS}
            result = run_fit_experiment(config, dataset, progress)
        write_fit_run(folder, result)
    _print_fit_table(config, result)
    console.print(f"\nRun folder: [bold]{folder}[/]  ·  report: [bold]{folder / 'report.html'}[/]")
    if "federated" in result.methods:
        _print_fit_serve_command(folder)


def _execute_retail(config: RunConfig, out: Path, overwrite: bool) -> None:
    """Train and score a demand, returns or fraud run, write its folder, print its table."""
    from fedshop.report.retail_run import METHOD_LABELS, write_retail_run
    from fedshop.report.run_folder import run_folder
    from fedshop.retail_experiment import run_retail_experiment
    from fedshop.retail_tasks import load_retail, score_run

    with run_folder(out, overwrite) as folder:
        with console.status("Building the table…"):
            table = load_retail(config)
        dataset = table.dataset
        rows = sum(len(s.train) + len(s.test) for s in dataset.silos)
        console.print(
            f"[bold]{dataset.name}[/]: {rows:,} rows, {dataset.n_silos} storefronts, "
            f"{len(dataset.pooled('test')):,} held out  [dim]({dataset.report.get('source', '')})[/]"
        )
        with _progress_bars(transient=False) as bars:
            progress = RichProgress(bars)
            progress.labels = {**progress.labels, **METHOD_LABELS}
            result = run_retail_experiment(config, dataset, progress)
        with console.status("Scoring…"):
            scores = score_run(result, table)
            write_retail_run(folder, result, scores)
    _print_retail_table(config, scores)
    console.print(f"\nRun folder: [bold]{folder}[/]  ·  report: [bold]{folder / 'report.html'}[/]")


def _print_retail_table(config: RunConfig, scores) -> None:
    table = Table(title=f"{config.task}: held-out rows of every storefront")
    for column in ("method", *scores.headline):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, scored in scores.methods.items():
        summary = scored["summary"]
        table.add_row(method, *(_cell(summary.get(k)) for k in scores.headline))
    console.print(table)


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value if value is not None else "–")


def _print_fit_serve_command(folder: Path) -> None:
    console.print(f"Serve fit advice: fedshop serve {folder}", highlight=False, soft_wrap=True)


def _print_fit_table(config: RunConfig, result) -> None:
    """Each method's fit metrics on the held-out records, and ε under DP."""
    from fedshop.report.fit_run import HEADLINE

    table = Table(title=f"Fit prediction on the {config.eval.split} records ({config.fit.model})")
    for column in ("method", "AUC (macro)", "silo-mean AUC", "accuracy", "recall small",
                   "recall fit", "recall large", "seconds"):  # fmt: skip
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, outcome in result.methods.items():
        m = outcome.summary
        table.add_row(method, *(f"{m[k]:.4f}" for k in HEADLINE), f"{outcome.seconds:.1f}")
    console.print(table)
    if result.privacy.epsilon is not None:
        console.print(f"Privacy: ε = {result.privacy.epsilon:.2f}, δ = {result.privacy.delta:.2g}")


@app.command()
def insight(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="ε each storefront spends on its release.")
    ] = 1.0,
    delta: Annotated[
        float | None,
        typer.Option("--delta", help="δ (default 1/(10·n), n = all storefronts' customers)."),
    ] = None,
    max_items: Annotated[
        int, typer.Option("--max-items", help="Items one customer may count for (sensitivity).")
    ] = 20,
    top: Annotated[int, typer.Option("--top", help="Items kept per storefront.")] = 10,
    budget: BudgetOption = None,
    ledger: LedgerOption = None,
    noise_seed: NoiseSeedOption = None,
    accountant: Annotated[
        str, typer.Option("--accountant", help=f"{help_text('accountant')}.")
    ] = "pld",
) -> None:
    """Cross-border insight: per storefront, the products that over-index against the whole shop,
    from counts each storefront releases under differential privacy (paid from its ledger budget);
    written to RUN_DIR/insight.json."""
    from fedshop.serve.insight import release_insight

    document = release_insight(
        run_dir, epsilon=epsilon, delta=delta, max_items=max_items, top=top, ledger_url=ledger,
        noise_seed=noise_seed, accountant=accountant, budget=budget,
    )  # fmt: skip
    _print_insight(document, Path(run_dir) / "insight.json")


def _print_insight(document: dict, path: Path, shown: int = 5) -> None:
    """Each storefront's first `shown` items as a table; those with none on one line."""
    empty = []
    for storefront in document["storefronts"]:
        items = storefront["items"][:shown]
        if not items:
            empty.append(storefront["name"])
            continue
        table = Table(title=f"{storefront['name']}: over-indexing items", title_justify="left")
        table.add_column("item", no_wrap=True)
        table.add_column("name")
        table.add_column("customers", justify="right")
        table.add_column("lift", justify="right")
        table.add_column(f"{document['interval']['level']:.0%} interval", justify="right")
        for item in items:
            low, high = item["interval"]
            table.add_row(
                item["item_id"], item["name"], f"{item['count']:.0f}",
                "–" if item["lift"] is None else f"{item['lift']:.2f}",
                f"{low:.2f}–{'∞' if high is None else f'{high:.2f}'}",
            )  # fmt: skip
        console.print(table)
    if empty:
        console.print(
            f"No item's count clears the noise (σ = {document['sigma']:.3g} customers) in: "
            f"{', '.join(empty)}",
            highlight=False,
        )
    console.print(
        f"[bold]Cross-border insight[/]: each of the {len(document['storefronts'])} storefronts "
        f"spent ε = {document['epsilon']:.3g}, δ = {document['delta']:.3g} per "
        f"{document['unit']} ({document['accountant']} accountant, σ = {document['sigma']:.3g}, "
        f"at most {document['max_items']} items per customer); written to {path}",
        highlight=False,
    )
    if document["noise_seed_known"]:
        console.print(
            "[bold red]Not private: noise seed known.[/] Anyone who has the seed can remove the "
            "noise.",
            highlight=False,
        )


# `fedshop demo` ends with the cross-border insight at this ε per storefront, paid from the ledger;
# a storefront without a budget there gets DEMO_INSIGHT_BUDGET (what the README's record-level
# example uses), so a first demo can release it and later ones stop when it is spent.
DEMO_INSIGHT_EPSILON = 1.0
DEMO_INSIGHT_BUDGET = 10.0


def _demo_insight(folder: Path) -> None:
    from fedshop.serve.insight import release_insight

    try:
        document = release_insight(folder, epsilon=DEMO_INSIGHT_EPSILON, budget=DEMO_INSIGHT_BUDGET)
    except FedShopError as exc:
        console.print(
            f"[bold]Cross-border insight[/] not released: {escape(str(exc))}", highlight=False
        )
        return
    _print_insight(document, folder / "insight.json")


@app.command()
def serve(
    run_dir: Annotated[
        Path, typer.Argument(help="A run folder, as train, demo or deploy local wrote it.")
    ],
    silo: Annotated[
        str | None,
        typer.Option(
            "--silo",
            help="Serve one storefront (name or slug): load the shared model and only this "
            "silo's private files, and refuse every other customer (default: all, for trials).",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (default 127.0.0.1: this machine only)."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port).")] = 8000,
    runs: Annotated[
        Path | None,
        typer.Option("--runs", help="Folder of run folders the page's operator view lists."),
    ] = None,
    index: Annotated[
        str,
        typer.Option(
            "--index",
            help="How to search the catalogue: exact, hnsw or ivf (a faiss index, cached in "
            "RUN_DIR/index), or auto: exact below 50,000 items, else ivf.",
        ),
    ] = "auto",
) -> None:
    """Serve a trained run's federated model to shoppers: the JSON API and the web page, until
    Ctrl-C. A fit run (train --task fit) is served as size and fit advice: GET /fit."""
    if not 0 <= port <= 65535:
        raise FedShopError(f"--port must be between 0 and 65535, got {port}")
    if runs is not None and not runs.is_dir():
        raise FedShopError(f"--runs {runs}: no such folder")
    import contextlib

    import torch
    import uvicorn

    from fedshop.serve.app import create_app
    from fedshop.serve.fit import FitServingModel, create_fit_app, serving_task
    from fedshop.serve.index import IndexSettings
    from fedshop.serve.model import ServingModel

    # One core per request: under concurrent requests torch's own threads would fight the other
    # requests for the same cores (on 2 cores, a 10 ms fold-in became seconds).
    torch.set_num_threads(1)
    fit_run = serving_task(run_dir) == "fit"
    if fit_run:  # `train --task fit`: size and fit advice (GET /fit), no page
        with console.status("Loading the fit run…"):
            fit_model = FitServingModel.load(run_dir, silo)
        served_app = create_fit_app(fit_model)
        lines = [
            f"Serving fit advice from {run_dir} ({fit_model.serving['model']}; "
            f"shops: {', '.join(fit_model.served)})"
        ]
    else:
        settings = IndexSettings(kind=index)
        with console.status("Loading the run (and building its index on a first start)…"):
            model = ServingModel.load(run_dir, silo, settings)
        served_app = create_app(model, runs)
        lines = [
            f"Serving {run_dir} ({model.serving['model']}, {model.serving['mode']}; "
            f"storefronts: {', '.join(model.served)})"
        ]
        if model.index is not None:
            how = {
                "hit": "loaded from",
                "miss": "built, cached in",
                "unwritable": "built; cannot cache in",
            }
            lines.append(
                f"Catalogue index: {model.index.kind} over {model.index.n_items:,} items, "
                f"{how[model.index.cache]} {model.run_dir / 'index'} "
                f"({model.index.build_seconds:.1f} s)"
            )
    listener = _listen(host, port)
    address, bound_port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound_port}/"
    for line in lines:
        console.print(escape(line), highlight=False, soft_wrap=True)
    warning = exposure_warning(host, address, bound_port)
    if warning:
        errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if fit_run:
        console.print(
            f"Ask [bold]{url}fit?customer=ID&item=CODE[/]  (API: {url}docs; Ctrl-C stops)",
            highlight=False,
        )
    else:
        console.print(f"Open [bold]{url}[/]  (API: {url}docs; Ctrl-C stops)", highlight=False)
    sys.stdout.flush()
    # No access log: its lines would put customer ids into the server's log. No websockets.
    config = uvicorn.Config(served_app, log_level="warning", access_log=False, ws="none")
    # Ctrl-C is how a server stops: uvicorn shuts down cleanly, then passes the signal on.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[listener])
    console.print("Stopped.")


def _listen(host: str, port: int):
    """A socket bound to host:port, or one line saying why not (a port in use, a bad address)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise FedShopError(f"--host {host}: {exc.strerror}") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        # Listening now: a client that reads the printed address before uvicorn has started waits
        # in the queue instead of being refused.
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise FedShopError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return listener


def exposure_warning(host: str, address: str, port: int) -> str | None:
    """What to tell the operator when the API listens beyond this machine (None on loopback)."""
    import ipaddress

    try:
        if ipaddress.ip_address(address.split("%")[0]).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"--host {host} listens beyond this machine: anyone who can reach port {port} here can "
        "read any served customer's recommendations and the purchases that explain them, with no "
        "login. Keep 127.0.0.1 unless a proxy that authenticates stands in front."
    )


privacy_app = typer.Typer(
    help="The privacy-budget ledger: budgets per silo and dataset, and what runs have spent.",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("ledger")
def privacy_ledger(
    ledger: LedgerOption = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the rows as a JSON list, nothing else (null: no budget)."
        ),
    ] = False,
) -> None:
    """Show every silo's budget, what it has spent, and what is left."""
    from fedshop.storage.ledger import Ledger

    book = Ledger(ledger)
    balances = book.balances()
    if as_json:
        # Plain print, not rich: the output is for scripts (`| jq`), so no markup, wrapping or color.
        rows = [dataclasses.asdict(b) for b in balances]
        for row, b in zip(rows, balances, strict=True):
            row["remaining_epsilon"] = None if b.budget_epsilon is None else b.remaining_epsilon
        print(json.dumps(rows, indent=2))
        return
    console.print(f"Privacy ledger: {book.url}", highlight=False, soft_wrap=True)
    if not balances:
        console.print("[dim]No budgets and no spends recorded yet.[/]")
    # One table per dataset, named in its title: at 80 columns a dataset column would cut
    # "amazon-sequential" or squeeze the numbers.
    for dataset in dict.fromkeys(b.dataset for b in balances):
        table = Table(title=dataset)
        table.add_column("silo", no_wrap=True)
        for header in ("budget ε", "budget δ", "spent ε", "spent δ", "left ε", "runs"):
            table.add_column(header, justify="right", no_wrap=True)
        for b in balances:
            if b.dataset == dataset:
                table.add_row(
                    b.silo,
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


@privacy_app.command("sweep")
def privacy_sweep(
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset (default: online-retail).")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", help="cross-silo (record-level DP) or cross-device (user-level)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for sweep.json and the report.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML run configuration.")
    ] = None,
    epsilons: Annotated[
        str | None,
        typer.Option(
            "--epsilons",
            help="Comma-separated target ε values (default "
            "0.5,1,2,4,8); the non-private run is always added.",
        ),
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="Data folder (overrides data.data_dir).")
    ] = None,
    protocol: Annotated[
        str | None, typer.Option("--protocol", help=f"{help_text('protocol')}.")
    ] = None,
    seed: SeedOption = None,
    rounds: RoundsOption = None,
    delta: DeltaOption = None,
    clip: ClipOption = None,
    budget: BudgetOption = None,
    ledger: LedgerOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train at several ε and without DP; write OUT/sweep.json and OUT/report.html (HR@10, NDCG@10
    and a membership-inference AUC against ε). Every DP point is spent in the privacy ledger."""
    from fedshop.data.datasets import load_dataset
    from fedshop.sweep import EPSILONS, run_sweep

    targets = EPSILONS if epsilons is None else (*_parse_epsilons(epsilons), None)
    run_config = load_config(
        config,
        overrides={
            "data.dataset": dataset,
            "data.data_dir": data_dir,
            "federated.mode": mode,
            "eval.protocol": protocol,
            "seed": seed,
            "federated.rounds": rounds,
            **_privacy_overrides(None, None, delta, None, clip, budget, ledger),
        },
    )
    out = out or _default_out("sweep")
    if (out / "sweep.json").exists() and not overwrite:
        raise FedShopError(f"{out} already holds a sweep; choose another --out or pass --overwrite")
    with console.status("Loading and cleaning data…"):
        data = load_dataset(
            run_config.data, seed=run_config.seed, protocol=run_config.eval.protocol
        )
    table = Table(title=f"Privacy sweep: {data.name}, {run_config.federated.mode}")
    for header in ("target ε", "ε", "δ", "z", "HR@10", "NDCG@10", "MIA AUC", "time"):
        table.add_column(header, justify="right")

    def on_point(point: dict) -> None:
        target = point["target_epsilon"]
        console.print(
            f"  ε = {'∞' if target is None else f'{target:g}'}: HR@10 {point['hr@10']:.4f}, "
            f"MIA AUC {point['mia_auc']:.3f} ({point['seconds']:.0f}s)"
        )
        table.add_row(
            "∞" if target is None else f"{target:g}",
            "∞" if point["epsilon"] is None else f"{point['epsilon']:.3g}",
            "–" if point["delta"] is None else f"{point['delta']:.2g}",
            "–" if point["noise_multiplier"] is None else f"{point['noise_multiplier']:.3g}",
            f"{point['hr@10']:.4f}", f"{point['ndcg@10']:.4f}", f"{point['mia_auc']:.3f}",
            f"{point['seconds']:.0f}s",
        )  # fmt: skip

    with _progress_bars(transient=True) as bars:
        run_sweep(run_config, data, out, targets, RichProgress(bars), on_point)
    console.print(table)
    console.print(
        f"\nSweep: [bold]{out / 'sweep.json'}[/]  ·  report: [bold]{out / 'report.html'}[/]"
    )


DeployProtectionOption = Annotated[
    str | None,
    typer.Option("--protection", help="How updates reach the server: "
                 f"{help_text('protection', tag='deploy')}."),
]  # fmt: skip
MinSilosOption = Annotated[
    int,
    typer.Option("--min-silos", help="Fewest replies a round is applied with (0: all sampled)."),
]
RoundTimeoutOption = Annotated[
    float, typer.Option("--round-timeout", help="Seconds to wait for a round's replies.")
]
OperatorCertOption = Annotated[
    Path | None,
    typer.Option(
        "--operator-cert",
        help="The operator's client certificate (deploy certs): needed for a SuperLink elsewhere.",
    ),
]
OperatorKeyOption = Annotated[
    Path | None, typer.Option("--operator-key", help="The operator certificate's private key.")
]
deploy_app = typer.Typer(
    help="Real deployment on Flower's deployment engine: one process per party, TLS, node keys.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("local")
def deploy_local(
    silos: Annotated[
        int | None,
        typer.Option(
            "--silos",
            help="Silos (SuperNode processes); default 4, a fit run's: its shops, a retail "
            "task's: its table's storefronts.",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML run configuration.")
    ] = None,
    out: OutOption = None,
    seed: SeedOption = None,
    rounds: RoundsOption = None,
    min_silos: MinSilosOption = 0,
    round_timeout: RoundTimeoutOption = 300.0,
    protection: DeployProtectionOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Run a TLS-authenticated federation on this machine: one SuperLink, one SuperNode per silo
    (each with only its own data file), FedShop's server as the ServerApp; writes the same run
    folder as the simulator and stops every process it started. A fit run (`task = "fit"`)
    deploys its shops the same way, a retail task (`task = "demand" | "returns" | "fraud"`) its
    table's storefronts."""
    if silos is not None and silos < 2:
        raise FedShopError("--silos must be at least 2")
    overrides = {"seed": seed, "federated.rounds": rounds, "protection.kind": protection}
    run_config = load_config(config, overrides=overrides)
    fit = run_config.task == "fit"
    table = run_config.task in RETAIL_TASKS
    # A fit run's shops come from [fit] silos, a retail task's storefronts from its table; a
    # recommender's silos from a count.
    if not (fit or table):
        silos = silos or 4
        more = {"data.max_silos": silos, "methods": ["federated"]}
        run_config = load_config(config, overrides={**overrides, **more})
    check_deployable(run_config)
    from fedshop.deploy.front_door import nginx_binary

    nginx_binary()  # the front door runs nginx: missing, it says how to install it before any work
    # Imported once the config is checked: a mistake in it answers without loading torch and Flower.
    from fedshop.deploy.launch import DeploySettings
    from fedshop.deploy.launch import deploy_local as run_deployment
    from fedshop.deploy.processes import commands
    from fedshop.report.run_folder import run_folder, write_run

    default = f"deploy-{run_config.task}" if fit or table else "deploy"
    with run_folder(out or _default_out(default), overwrite) as out:
        with console.status("Loading and cleaning data…"):
            dataset = _deploy_dataset(run_config)
        if silos is not None and dataset.n_silos != silos:
            raise FedShopError(
                f"{dataset.name} splits into {dataset.n_silos} silos here, not {silos}; "
                "choose --silos accordingly"
            )
        console.print(
            f"[bold]Local federation[/]: 1 SuperLink + {dataset.n_silos} SuperNodes on 127.0.0.1, "
            "TLS and "
            "SuperNode authentication on, the silos through the front door (nginx); silos: "
            f"{', '.join(dataset.silo_names)}"
        )
        settings = DeploySettings(min_silos=min_silos, round_timeout=round_timeout)
        result = run_deployment(
            run_config, dataset, out, settings, on_line=lambda line: console.print(f"  {line}")
        )
        if fit:
            from fedshop.report.fit_run import write_fit_run

            write_fit_run(out, result)
        elif table:
            from fedshop.report.retail_counts import score_counts
            from fedshop.report.retail_run import write_retail_run

            scores = score_counts(dataset, result.per_silo)
            write_retail_run(out, result.result, scores)
        else:
            write_run(out, result)
    if fit:
        _print_fit_table(run_config, result)
    elif table:
        _print_retail_table(run_config, scores)
    else:
        _print_tables(result)
    console.print(f"\nRun folder: [bold]{out}[/]  ·  report: [bold]{out / 'report.html'}[/]")
    if fit:
        _print_fit_serve_command(out)
    elif not table:
        _print_serve_command(result, out)
    print_commands(console, commands(dataset.n_silos, "superlink.example.com"))


def print_commands(out: Console, text: str) -> None:
    """Commands to copy and paste: not wrapped at the terminal's width, where a break inside an
    argument would not paste back."""
    out.print("\n[dim]The same on separate hosts:[/]")
    out.print(escape(text), highlight=False, soft_wrap=True)


@deploy_app.command("run")
def deploy_run(
    superlink: Annotated[
        str,
        typer.Option(
            "--superlink",
            help="The SuperLink's 127.0.0.1:PORT, or the operator listener's HOST:PORT.",
        ),
    ],
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML run configuration.")],
    silos: Annotated[int, typer.Option("--silos", help="How many silos the federation has.")],
    out: Annotated[Path, typer.Option("--out", help="The server's folder (on this host).")],
    nodes: Annotated[
        Path,
        typer.Option(
            "--nodes", help="Which node serves which silo, as `deploy register` wrote it."
        ),
    ],
    ca: Annotated[
        Path | None, typer.Option("--ca", help="The deployment's CA certificate (TLS).")
    ] = None,
    min_silos: MinSilosOption = 0,
    round_timeout: RoundTimeoutOption = 300.0,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds to wait for silos to come online.")
    ] = 300.0,
    operator_cert: OperatorCertOption = None,
    operator_key: OperatorKeyOption = None,
) -> None:
    """On the SuperLink host: submit a FedShop run to a running SuperLink and follow it. The server
    writes its checkpoints, log, outcome and final model into OUT/server; the same command again
    resumes from the last checkpoint. (Through the operator listener from elsewhere, OUT must be
    the same path on the coordinator: the server opens it there.)"""
    from fedshop.deploy.identities import SiloNodes
    from fedshop.deploy.launch import DeploySettings, LogFollower, run_config
    from fedshop.deploy.processes import operator_control
    from fedshop.storage.private_files import write_private

    run = load_config(config)
    check_deployable(run)
    if ca is None:
        raise FedShopError("--ca is required: FedShop deployments use TLS")
    if run.privacy.enabled:
        from fedshop.experiment import record_level_plan

        record_level_plan(
            run, None
        )  # the server's plan: refuses a config without δ, before submitting
    registered = SiloNodes.read(nodes)  # refuses a missing or malformed map before submitting
    if sorted(registered.node_of) != list(range(silos)):
        raise FedShopError(
            f"{nodes} registers silos {sorted(registered.node_of)}; a federation of {silos} "
            f"silos needs exactly 0 to {silos - 1}"
        )
    operator = _operator_credential(operator_cert, operator_key)
    settings = DeploySettings(
        min_silos=min_silos, round_timeout=round_timeout, wait_timeout=wait_timeout
    )
    # The Control API first: a SuperLink this command may not reach is refused before any file.
    with operator_control(out / "flwr-home", superlink, ca, operator) as control:
        server = (out / "server").resolve()
        write_private(server / "config.toml", run.to_toml())  # owner-only, as all the server writes
        settings_record = run_config(out.resolve(), server / "config.toml", silos, settings, nodes)
        run_id = control.submit(settings_record, out / "app")
        console.print(f"Run {run_id} submitted to {superlink}; following {server / 'server.log'}")
        follower = LogFollower(server / "server.log", lambda line: console.print(f"  {line}"))
        control.wait(run_id, settings.run_timeout, follower)
        follower()
    console.print(
        f"Outcome: [bold]{server / 'outcome.json'}[/], model {server / 'shared.safetensors'}"
    )


@deploy_app.command("register")
def deploy_register(
    keys: Annotated[list[Path], typer.Argument(help="Silos' public key files (.pub).")],
    superlink: Annotated[
        str,
        typer.Option(
            "--superlink",
            help="The SuperLink's 127.0.0.1:PORT, or the operator listener's HOST:PORT.",
        ),
    ],
    ca: Annotated[Path, typer.Option("--ca", help="The deployment's CA certificate.")],
    nodes: Annotated[
        Path,
        typer.Option(
            "--nodes",
            help="The file to write which node serves which silo to (kept "
            "by the operator; `deploy run --nodes` reads it).",
        ),
    ] = Path("deployment/node-silos.json"),
    operator_cert: OperatorCertOption = None,
    operator_key: OperatorKeyOption = None,
) -> None:
    """Register silos' SuperNode keys (silo-<i>.pub) with the SuperLink: only registered nodes
    may join, and the server takes each node for the silo whose key it registered, whatever the
    node says of itself. On the coordinator against the SuperLink's loopback address, or from
    elsewhere through the front door's operator listener with the operator's certificate and key."""
    import tempfile

    from fedshop.deploy.identities import SiloNodes, silo_of_key
    from fedshop.deploy.processes import operator_control

    registered = SiloNodes.read(nodes) if nodes.exists() else SiloNodes()
    silos = [silo_of_key(key) for key in keys]  # every name checked before anything is registered
    for key in keys:
        if not key.is_file():
            raise FedShopError(f"public key file {key} does not exist")
    operator = _operator_credential(operator_cert, operator_key)
    with (
        tempfile.TemporaryDirectory() as home,
        operator_control(Path(home), superlink, ca, operator) as control,
    ):
        for silo, key in zip(silos, keys, strict=True):
            registered.add(silo, control.register(key))
            registered.write(nodes)  # after each: a failure later keeps what was registered
            console.print(f"registered {key} as silo {silo} (node {registered.node_of[silo]})")


def _operator_credential(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    if (cert is None) != (key is None):
        raise FedShopError("--operator-cert and --operator-key go together")
    return (cert, key) if cert is not None and key is not None else None


@deploy_app.command("certs")
def deploy_certs(
    host: Annotated[
        list[str], typer.Option("--host", help="The SuperLink's host name or IP (repeatable).")
    ],
    silos: Annotated[int, typer.Option("--silos", help="How many silo key pairs to make.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for certs/ and keys/.")],
) -> None:
    """Make the CA, the SuperLink's certificate, the operator's client certificate, and one
    SuperNode key pair per silo."""
    from fedshop.deploy.pki import make_audit_keys, make_node_keys, make_tls

    if silos < 1:
        raise FedShopError("--silos must be at least 1")
    # The SuperLink binds loopback and its front door reaches it there: the certificate names it too.
    loopback = [name for name in ("localhost", "127.0.0.1") if name not in host]
    files = make_tls(out / "certs", [*host, *loopback])
    for index in range(silos):
        make_node_keys(out / "keys", f"silo-{index}")
        make_audit_keys(out / "keys", f"silo-{index}")
    console.print(
        f"CA [bold]{files.ca}[/] (to every silo), SuperLink certificate {files.certificate} and "
        f"key {files.key} (stay on the SuperLink host), operator certificate "
        f"{files.operator_certificate} and key {files.operator_key} (the operator's only: they "
        f"open the Control API), {silos} SuperNode key pairs and {silos} audit key pairs "
        f"(audit-silo-i.key: give silo i --node-config audit-key=…) in {out / 'keys'} (each private key to its "
        "silo only; register the SuperNode .pub files)"
    )


@deploy_app.command("front-door")
def deploy_front_door(
    certs: Annotated[
        Path, typer.Option("--certs", help="deploy certs' certs/ folder (CA, SuperLink cert+key).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for nginx's config and logs.")],
    superlink_port: Annotated[
        int, typer.Option("--superlink-port", help="The SuperLink's port on 127.0.0.1.")
    ] = 9091,
    port: Annotated[int, typer.Option("--port", help="The silos' port (Fleet API only).")] = 9092,
    operator_port: Annotated[
        int,
        typer.Option("--operator-port", help="The operator's port (client certificate; 0: none)."),
    ] = 9093,
    listen: Annotated[
        str, typer.Option("--listen", help="The address both listen on (0.0.0.0: all).")
    ] = "0.0.0.0",
) -> None:
    """On the coordinator: nginx in front of the SuperLink, which binds 127.0.0.1 only. The silos'
    port forwards the Fleet API and nothing else; the operator's port forwards the Control API to a
    client with the operator's certificate. Runs in the foreground (Ctrl-C stops it)."""
    import os

    from fedshop.deploy.front_door import Address, nginx_command, write_front_door

    public = Address.parse(f"{listen}:{port}")
    operator = Address.parse(f"{listen}:{operator_port}") if operator_port else None
    config = write_front_door(
        out, superlink_port, certs / "ca.crt", certs / "superlink.crt", certs / "superlink.key",
        public, operator,
    )  # fmt: skip
    command = nginx_command(config)
    console.print(
        f"Front door: silos on {public}, operator on {operator or 'none'}, SuperLink on "
        f"127.0.0.1:{superlink_port}; {' '.join(command)}",
        soft_wrap=True,
    )
    sys.stdout.flush()
    os.execv(command[0], command)


@deploy_app.command("silo-data")
def deploy_silo_data(
    out: Annotated[Path, typer.Option("--out", help="Folder for the silo files.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML run configuration.")
    ] = None,
) -> None:
    """Write each silo's data file (silo-N.npz) from a dataset: hand each silo only its own (a fit
    run's: each shop its own records and customers' measurements)."""
    from fedshop.deploy.launch import customer_counts, write_silo_files

    run_config = load_config(config)
    dataset = _deploy_dataset(run_config)
    paths = write_silo_files(run_config, dataset, out)
    counts = customer_counts(dataset)
    unit = "training rows" if run_config.task in RETAIL_TASKS else "customers"
    for name, path, count in zip(dataset.silo_names, paths, counts, strict=True):
        console.print(f"{path}  ({name}, {count:,} {unit})")
    console.print(
        "Beside each file, its silo's policy (silo-<i>.policy.toml): the least protection the silo "
        "accepts and its own privacy budget. Each silo reviews its own before it joins.",
        highlight=False,
    )


vertical_app = typer.Typer(
    help="Vertical federation: a label holder and feature holders that hold different columns "
    "about the same shoppers, aligned by PSI, trained by split learning.",
    no_args_is_help=True,
)
app.add_typer(vertical_app, name="vertical")
VerticalConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML vertical configuration.")
]
CustomersOption = Annotated[
    int | None,
    typer.Option("--max-customers", help="A seeded sample of this many customers (0: all)."),
]
VerticalRoundsOption = Annotated[
    int | None, typer.Option("--rounds", help="Backward+forward exchanges of split learning.")
]


def _vertical_setup(config: Path | None, seed, max_customers, rounds, protocol=None):
    from fedshop.vertical.settings import load_vertical_config

    return load_vertical_config(
        config,
        overrides={
            "seed": seed,
            "scenario.max_customers": max_customers,
            "split.rounds": rounds,
            "psi.protocol": protocol,
        },
    )


def _vertical_settings(vconfig):
    from fedshop.vertical.simulate import VerticalSettings

    return VerticalSettings(
        data_dir=vconfig.data_dir or None,
        fractions=vconfig.scenario.fractions,
        feature_holders=vconfig.scenario.feature_holders,
        max_customers=vconfig.scenario.max_customers,
    )


def _print_vertical(result: dict, out: Path) -> None:
    table = Table(title="Fit prediction on the aligned customers' test rentals")
    for column in ("model", "macro AUC", "accuracy", "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for key, label in (
        ("joint", "joint (split learning)"),
        ("label_holder_only", "label holder alone"),
        ("centralized", "centralized (pooled, reference)"),
    ):
        block = result.get(key)
        if block:
            table.add_row(
                label, f"{block['macro_auc']:.4f}", f"{block['accuracy']:.4f}",
                f"{block['seconds']:.1f}",
            )  # fmt: skip
    console.print(table)
    psi = result.get("psi", {})
    if psi:
        console.print(
            f"PSI ({psi.get('protocol')}): {psi.get('aligned_customers', '?')} customers aligned"
        )
    console.print(f"\nRun folder: [bold]{out}[/]  ·  report: [bold]{out / 'report.html'}[/]")


@vertical_app.command("simulate")
def vertical_simulate(
    config: VerticalConfigOption = None,
    out: OutOption = None,
    seed: SeedOption = None,
    max_customers: CustomersOption = None,
    rounds: VerticalRoundsOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Every party in this process (each still sees only its own table and the messages): the
    joint model, both baselines and the attacks with and without protection."""
    vconfig = _vertical_setup(config, seed, max_customers, rounds)
    if vconfig.psi.reveal_to != "both":
        raise FedShopError(
            "training needs both parties to know the aligned customers: psi.reveal_to = "
            '"both" (reveal_to = "label" is for counting an audience overlap only)'
        )
    from fedshop.secure.psi import require_backend

    require_backend(vconfig.psi.protocol)  # a missing library says how to install it, at once
    from fedshop.report.run_folder import run_folder
    from fedshop.report.vertical_run import write_vertical_run
    from fedshop.vertical.simulate import run_vertical

    with run_folder(out or _default_out("vertical"), overwrite) as out:
        with console.status("Training the joint model, the baselines and the attacks…"):
            result = run_vertical(
                _vertical_settings(vconfig), vconfig.plan, vconfig.seed,
                psi_protocol=vconfig.psi.protocol,
            )  # fmt: skip
        result["runtime"] = "simulator"
        write_vertical_run(out, vconfig.to_toml(), result)
    _print_vertical(result, out)


@vertical_app.command("local")
def vertical_local(
    config: VerticalConfigOption = None,
    out: OutOption = None,
    seed: SeedOption = None,
    max_customers: CustomersOption = None,
    rounds: VerticalRoundsOption = None,
    round_timeout: RoundTimeoutOption = 300.0,
    overwrite: OverwriteOption = False,
) -> None:
    """The scenario as real parties on this machine: the label holder as Flower's ServerApp, each
    feature holder a SuperNode with only its own file, TLS and node authentication, PSI over a
    TLS link between them. Then the centralized reference and the attacks, in this process."""
    vconfig = _vertical_setup(config, seed, max_customers, rounds)
    if vconfig.psi.protocol == "openmined":
        raise FedShopError(
            "fedshop vertical local runs PSI over a direct link: psi.protocol rr22, kkrt or ecdh "
            "(openmined runs in the simulator and the PSI benchmark)"
        )
    if vconfig.psi.reveal_to != "both":
        raise FedShopError(
            "training needs both parties to know the aligned customers: psi.reveal_to = "
            '"both" (reveal_to = "label" is for counting an audience overlap only)'
        )
    from fedshop.deploy.front_door import nginx_binary

    nginx_binary()
    from fedshop.deploy.vertical_launch import deploy_vertical
    from fedshop.report.run_folder import run_folder
    from fedshop.report.vertical_run import write_vertical_run
    from fedshop.vertical.simulate import build_scenario, run_vertical

    settings = _vertical_settings(vconfig)
    with run_folder(out or _default_out("vertical-local"), overwrite) as out:
        with console.status("Loading RentTheRunway and splitting it between the parties…"):
            scenario = build_scenario(settings, vconfig.seed)
        console.print(
            f"[bold]Local vertical federation[/]: label holder {scenario.label.name} (ServerApp) + "
            f"{len(scenario.features)} feature holder(s) "
            f"({', '.join(t.name for t in scenario.features)}) as SuperNodes on 127.0.0.1, TLS "
            "and node authentication on; PSI over a mutually authenticated TLS link"
        )
        deployed = deploy_vertical(
            vconfig, scenario, out, on_line=lambda line: console.print(f"  {line}"),
            round_timeout=round_timeout,
        )  # fmt: skip
        with console.status("The centralized reference and the attacks (simulator)…"):
            simulated = run_vertical(settings, vconfig.plan, vconfig.seed)
        result = {
            **deployed,
            "runtime": "deployment",
            "centralized": simulated.get("centralized"),
            "joint_vs_centralized": deployed["joint"]["macro_auc"]
            / simulated["centralized"]["macro_auc"],
            "simulator_joint": simulated["joint"],
            "protection": {
                "measured_in": "the simulator, same scenario, plan and seed (it plays the "
                "attacker with the ground truth no party has)",
                **simulated["protection"],
            },
            "scenario": simulated["scenario"],
        }
        write_vertical_run(out, vconfig.to_toml(), result)
    _print_vertical(result, out)


def _parse_epsilons(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FedShopError(
            f"--epsilons must be numbers separated by commas, got '{text}'"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise FedShopError(f"--epsilons must be positive numbers, got '{text}'")
    return tuple(sorted(values))


audit_app = typer.Typer(
    help="The run's audit log: a hash-chained, signed record of every round and weights file.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (it holds audit.jsonl).")],
    keys: Annotated[
        Path | None,
        typer.Option(
            "--keys",
            help="A folder of the parties' own public audit keys (audit-silo-<i>.pub, a "
            "deployment's keys/): the header's keys must be these.",
        ),
    ] = None,
) -> None:
    """Check the run's audit log: the chain, every signature (the server's on every entry, each
    party's on the models it received and on its own weights files) and that every weights file of
    the run is the one the log names. Exits non-zero naming the first bad entry or file."""
    from rich.table import Table

    from fedshop.storage.audit import Problem, check_party_keys, verify_run

    if not run_dir.is_dir():
        raise FedShopError(f"{run_dir}: no such folder")
    if keys is not None and not keys.is_dir():
        raise FedShopError(f"--keys {keys}: no such folder")
    result = verify_run(run_dir)
    if keys is not None and not isinstance(result, Problem):
        result = check_party_keys(result, keys) or result
    if isinstance(result, Problem):
        errors.print(
            f"[red]audit verification failed:[/] {escape(str(result))}",
            soft_wrap=True, highlight=False,
        )  # fmt: skip
        raise typer.Exit(1)
    parties = ", ".join(p["name"] for p in result.parties.values()) or "none (server only)"
    table = Table(title=f"Audit log of {run_dir}", show_header=False)
    table.add_row("run", result.run)
    table.add_row("rounds", str(result.rounds))
    table.add_row("parties", parties)
    table.add_row("party keys", f"the ones in {keys}" if keys else "the header's (not checked)")
    table.add_row("party signatures checked", str(result.acks))
    table.add_row("weights files checked", str(len(result.files)))
    signers = sorted(set(result.signed_by.values()), key=lambda who: (who != "server", who))
    for who in signers:
        count = sum(1 for signer in result.signed_by.values() if signer == who)
        table.add_row(f"  signed by {who}", f"{count} files")
    console.print(table)
    console.print("[green]verified[/]: the chain, every signature and every weights file.")


def main() -> None:
    # Usage errors (unknown option, bad value type) are reported by typer itself with exit status 2;
    # our own user-facing errors become one line and status 2 as well.
    try:
        app()
    except FedShopError as exc:
        # Escaped: messages name config sections like "[privacy]", which rich would read as markup.
        errors.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except InterruptError:
        errors.print("interrupted (Ctrl-C): stopped before the end", highlight=False)
        sys.exit(130)

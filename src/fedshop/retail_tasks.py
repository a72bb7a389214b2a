"""The retail tasks beyond recommendation: which table each builds and how each scores a run.

demand   Online Retail's weekly units per (stock code, country), quantile forecasts, an inventory
         policy driven by them, against per-series statistical baselines (data/demand.py,
         eval/forecast.py, eval/forecast_baselines.py, eval/inventory.py)
returns  Online Retail's purchase lines labelled by whether the customer cancelled them later, and
         the merchandiser's DP view of items returned abnormally often (data/returns.py,
         privacy/return_quality.py)
fraud    a public labelled e-commerce fraud table, storefronts by country (data/fraud.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedshop.config import RunConfig
from fedshop.data.demand import DemandSettings, WeeklyDemand, load_demand, predictions_in_units
from fedshop.data.tabular import TabularDataset
from fedshop.eval.forecast import evaluate_demand
from fedshop.eval.inventory import InventorySettings, inventory_report
from fedshop.report.retail_run import (
    COLOURS,
    Figure,
    Scores,
    quality_table,
    silo_gain_figure,
    svg_of,
)
from fedshop.retail_experiment import RetailResult, score_binary


@dataclass
class RetailTable:
    """A task's table, and what its scoring needs beside it (demand: the weekly series; returns:
    the labelled purchase lines the DP quality view releases counts of, and its ledger)."""

    dataset: TabularDataset
    weekly: WeeklyDemand | None = None
    lines: Any = None
    ledger: Any = None


def demand_settings(config: RunConfig) -> DemandSettings:
    return DemandSettings(horizon=config.retail.horizon, lags=config.retail.lags)


def load_retail(config: RunConfig, quality: bool = True) -> RetailTable:
    """The task's table; `quality` False: no DP quality view for a returns run (a deployment's
    storefronts never pool lines for one), so no ledger is consulted."""
    data = config.data
    if config.task == "demand":
        dataset, weekly = load_demand(demand_settings(config), data)
        return RetailTable(dataset, weekly)
    if config.task == "returns":
        from fedshop.data.datasets import load_cleaned_retail
        from fedshop.data.returns import ReturnsSettings, build_returns_dataset, labelled_lines

        cleaned = load_cleaned_retail(data)
        settings = ReturnsSettings(max_silos=data.max_silos)
        labelled = labelled_lines(cleaned, settings)
        lines = labelled[0]
        # The quality view's budget is checked before the table is built or anything trained.
        viewed = quality and config.retail.quality_epsilon > 0
        ledger = quality_ledger(config, lines) if viewed else None
        dataset = build_returns_dataset(cleaned, settings, labelled)
        return RetailTable(dataset, lines=lines if ledger is not None else None, ledger=ledger)
    from fedshop.data.fraud import FraudSettings, build_fraud_dataset

    # The day-blocked split's fold (5 folds); with [data] max_silos, the largest countries keep
    # their own storefront and "Other" and "Unknown" take the rest.
    countries = max(data.max_silos - 2, 0) if data.max_silos else FraudSettings.countries
    settings = FraudSettings(countries=countries, seed=config.seed % 5)
    return RetailTable(build_fraud_dataset(settings, data.data_dir, data.path))


def load_retail_dataset(config: RunConfig) -> TabularDataset:
    """The task's table alone (what `fedshop deploy` splits into storefront files)."""
    return load_retail(config, quality=False).dataset


QUALITY_DATASET = "online-retail"  # the ledger's dataset: the storefronts' one budget on it


def quality_ledger(config: RunConfig, lines):
    """The ledger the quality view pays from, checked before any training: every storefront must
    afford ε = [retail] quality_epsilon. A storefront without a budget gets [privacy] budget (ε,
    and δ = 1/n) when one is configured; else the run stops here, saying how to set one."""
    from fedshop.privacy.return_quality import QualitySettings
    from fedshop.storage.ledger import BudgetExceededError, Ledger

    ledger = Ledger(config.privacy.ledger_url or None)
    epsilon = config.retail.quality_epsilon
    periods = lines[lines["period"].isin(QualitySettings().periods)]
    population = int(periods["CustomerID"].nunique())
    for storefront in sorted(periods["silo"].unique()):
        if ledger.balance(storefront, QUALITY_DATASET).budget_epsilon is None:
            if config.privacy.budget <= 0:
                raise BudgetExceededError(
                    f"no privacy budget is set for storefront '{storefront}' on "
                    f"'{QUALITY_DATASET}' for the quality view: set [privacy] budget, or "
                    "`fedshop privacy budget`, or [retail] quality_epsilon = 0 for no quality view"
                )
            ledger.set_budget(storefront, QUALITY_DATASET, config.privacy.budget, 1.0 / population)
        try:
            ledger.check(storefront, QUALITY_DATASET, epsilon, 1.0 / (10 * population))
        except BudgetExceededError as exc:
            raise BudgetExceededError(
                f"{exc}; the quality view would overspend it: nothing was trained or released"
            ) from None
    return ledger


def score_run(result: RetailResult, table: RetailTable, baselines: dict | None = None) -> Scores:
    """`baselines`: demand's per-series baselines when already computed (`demand_baselines`)."""
    if result.dataset.kind != "binary":
        return score_demand(result, table.weekly, baselines)
    scores = score_classifier(result)
    if table.lines is not None:
        scores.blocks["quality"] = quality_block(result.config, table)
        scores.figures.append(quality_table(scores.blocks["quality"]))
    return scores


def quality_block(config: RunConfig, table: RetailTable) -> dict[str, Any]:
    """The merchandiser's view: items returned abnormally often, from every storefront's counts
    released under DP and paid from its ledger (privacy/return_quality.py)."""
    from fedshop.privacy.return_quality import quality_view

    view = quality_view(
        table.lines, epsilon=config.retail.quality_epsilon, ledger=table.ledger,
        noise_seed=config.privacy.known_noise_seed, accountant=config.privacy.accountant,
        dataset=QUALITY_DATASET, seed=config.seed,
    )  # fmt: skip
    columns = ["item_id", "name", "rate", "low", "high", "flagged", "confirmed"]
    tested = view.items.sort_values("low", ascending=False)
    return {
        "epsilon": view.epsilon,
        "delta": view.delta,
        "noise_multiplier": view.noise_multiplier,
        "noise_seed_known": config.privacy.known_noise_seed is not None,
        "overall_rate": view.overall_rate,
        "threshold": view.threshold,
        "storefronts": view.storefronts,
        "flagged": view.flagged[columns].to_dict("records"),
        "top_items": tested[columns].head(20).to_dict("records"),
        "report": view.report,
    }


def inventory_settings(config: RunConfig, stockout_cost: float | None = None) -> InventorySettings:
    retail = config.retail
    return InventorySettings(
        retail.holding_cost, stockout_cost or retail.stockout_cost, retail.lead_time
    )


def demand_baselines(config: RunConfig, weekly: WeeklyDemand) -> dict:
    """The per-series baselines (they depend on the weekly series alone, not on the seed)."""
    from fedshop.eval.forecast_baselines import run_baselines

    levels = np.asarray(config.retail.quantiles)
    return run_baselines(
        weekly.train, config.retail.horizon, levels, statistical=config.retail.statistical_baseline
    )


def demand_forecasts(
    result: RetailResult, weekly: WeeklyDemand, baselines: dict | None = None
) -> dict[str, tuple]:
    """Per method, its (point, quantiles, seconds) forecasts of every series' test weeks, in
    units: the networks' median and quantiles, and the per-series baselines' own point forecasts."""
    config, dataset = result.config, result.dataset
    levels = np.asarray(config.retail.quantiles)
    median = list(levels).index(0.5)
    out = {}
    for method, trained in result.methods.items():
        quantiles = predictions_in_units(
            dataset, [trained.predictions[s.name] for s in dataset.silos]
        )
        out[method] = (quantiles[..., median], quantiles, trained.seconds)
    if baselines is None:
        baselines = demand_baselines(config, weekly)
    for name, baseline in baselines.items():
        out[name] = (baseline.point, baseline.quantiles, baseline.seconds)
    return out


def score_demand(
    result: RetailResult, weekly: WeeklyDemand, baselines: dict | None = None
) -> Scores:
    config = result.config
    levels = np.asarray(config.retail.quantiles)
    forecasts = demand_forecasts(result, weekly, baselines)
    country = weekly.series_country
    methods, inventory_blocks = {}, {}
    for method, (point, quantiles, seconds) in forecasts.items():
        scored = evaluate_demand(
            point, quantiles, levels, weekly.test, weekly.train, country, inventory_settings(config)
        )
        accuracy, inventory = scored["accuracy"], scored["inventory"]
        per_country = accuracy["per_country"]
        summary = {
            "wape": accuracy["overall"]["wape"],
            "silo_mean_wape": float(np.mean([v["wape"] for v in per_country.values()])),
            "mase": accuracy["overall"]["mase"],
            "wape_intermittent": accuracy["intermittent"]["wape"],
            "mase_intermittent": accuracy["intermittent"]["mase"],
            "wape_smooth": accuracy["smooth"]["wape"],
            "scaled_pinball": accuracy["overall"]["scaled_pinball"],
            "inventory_cost": inventory["overall"]["total_cost"],
            "holding_cost": inventory["overall"]["holding_cost"],
            "stockout_cost": inventory["overall"]["stockout_cost"],
            "fill_rate": inventory["overall"]["fill_rate"],
            "seconds": round(seconds, 3),
        }
        per_silo = {
            c: {
                **{k: per_country[c][k] for k in ("series", "wape", "mase")},
                "inventory_cost": inventory["per_country"][c]["total_cost"],
                "fill_rate": inventory["per_country"][c]["fill_rate"],
            }
            for c in per_country
        }
        methods[method] = {"summary": summary, "per_silo": per_silo}
        inventory_blocks[method] = inventory["overall"]
    blocks = {
        "inventory": {
            "assumptions": inventory["assumptions"],  # the same for every method
            "by_method": inventory_blocks,
            "cost_curve": cost_curve(forecasts, weekly, config),
        },
        "series": {
            "count": len(weekly.units), "train_weeks": weekly.n_train,
            "test_weeks": weekly.units.shape[1] - weekly.n_train,
        },
    }  # fmt: skip
    figures = [
        forecast_figure(forecasts, weekly, levels),
        inventory_figure(blocks["inventory"]["cost_curve"]),
    ]
    notes = [
        "WAPE = Σ|actual − forecast| / Σ actual over every series' test weeks (the networks' "
        "forecast is their median); silo_mean_wape: the unweighted mean over countries. MASE: per "
        "series MAE over the test weeks / its mean absolute weekly change in the training weeks. "
        "Intermittent: ADI > 1.32 (Syntetos–Boylan). The inventory policy orders up to the "
        "forecast's b/(b+h) quantile each week; lost sales; costs are stated assumptions.",
    ]
    headline = (
        "wape", "silo_mean_wape", "mase", "wape_intermittent", "scaled_pinball", "inventory_cost",
        "fill_rate",
    )  # fmt: skip
    return Scores(methods, headline, blocks, figures, notes)


STOCKOUT_COSTS = (1.0, 2.0, 4.0, 8.0, 16.0)


def cost_curve(forecasts: dict, weekly: WeeklyDemand, config: RunConfig) -> dict[str, list]:
    """Per method, the policy's total cost at each stock-out cost (holding cost fixed)."""
    levels = np.asarray(config.retail.quantiles)
    country = weekly.series_country
    out: dict[str, list] = {"stockout_costs": list(STOCKOUT_COSTS)}
    for method, (_, quantiles, _) in forecasts.items():
        out[method] = [
            inventory_report(
                quantiles, levels, weekly.test, country, inventory_settings(config, b)
            )["overall"]["total_cost"]
            for b in STOCKOUT_COSTS
        ]
    return out


def forecast_figure(forecasts: dict, weekly: WeeklyDemand, levels: np.ndarray) -> Figure:
    """Four series a planner would check: the two largest of the largest storefront and the
    largest of the next two, history, actual test weeks and each method's forecast."""
    import matplotlib.pyplot as plt

    volume = weekly.train.sum(axis=1)
    chosen = []
    for silo in range(min(3, len(weekly.silo_names))):
        rows = np.flatnonzero(weekly.silo == silo)
        chosen += list(rows[np.argsort(-volume[rows])][: 2 if silo == 0 else 1])
    figure, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    weeks = np.arange(weekly.units.shape[1])
    test = weeks[weekly.n_train :]
    low, high = list(levels).index(levels.min()), list(levels).index(levels.max())
    for axis, row in zip(axes.flat, chosen, strict=False):
        start = max(0, weekly.n_train - 20)
        axis.plot(weeks[start:], weekly.units[row, start:], color="black", label="actual")
        for method in ("federated", "best_statistical", "seasonal_naive"):
            if method in forecasts:
                point, quantiles, _ = forecasts[method]
                axis.plot(test, point[row], color=COLOURS[method], label=method)
                if method == "federated":
                    axis.fill_between(
                        test, quantiles[row, :, low], quantiles[row, :, high],
                        color=COLOURS[method], alpha=0.2,
                    )  # fmt: skip
        axis.axvline(weekly.n_train - 0.5, color="grey", linestyle=":")
        axis.set_title(f"{weekly.stock_codes[row]} · {weekly.countries[row]}", fontsize=9)
        axis.set_xlabel("week", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    return Figure(
        "Forecast against actual, chosen items",
        svg_of(figure),
        f"Weekly units; the dotted line starts the test weeks. Band: the federated forecast's "
        f"{levels.min():g}–{levels.max():g} quantiles.",
    )


def inventory_figure(curve: dict[str, list]) -> Figure:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    costs = curve["stockout_costs"]
    for method, values in curve.items():
        if method != "stockout_costs":
            axis.plot(costs, values, marker="o", label=method, color=COLOURS.get(method))
    axis.set(xscale="log", xlabel="stock-out cost per lost unit (holding cost 1)",
             ylabel="total cost over the test weeks")  # fmt: skip
    axis.legend(fontsize=8)
    return Figure(
        "Inventory cost by stock-out cost",
        svg_of(figure),
        "The same base-stock policy driven by each method's quantile forecasts, re-run at each "
        "stock-out cost (its order-up-to quantile b/(b+h) moves with it).",
    )


def score_classifier(result: RetailResult) -> Scores:
    dataset = result.dataset
    methods = {m: score_binary(dataset, t.predictions) for m, t in result.methods.items()}
    figures = [pr_curves(result), silo_gain_figure(dataset, methods)]
    notes = [
        "AUC-PR is average precision over all held-out rows (every row once); silo_mean_* is the "
        "unweighted mean over storefronts with at least one positive, so a small storefront counts "
        "as much as a large one. recall@fpr: the share of positives flagged at a 1 % false-positive "
        "rate."
    ]
    headline = ("auc_pr", "silo_mean_auc_pr", "auc", "recall@fpr", "silo_mean_recall@fpr")
    return Scores(methods, headline, figures=figures, notes=notes)


def pr_curves(result: RetailResult) -> Figure:
    import matplotlib.pyplot as plt

    labels = result.dataset.pooled("test").target > 0.5
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for method, trained in result.methods.items():
        scores = np.concatenate([trained.predictions[s.name] for s in result.dataset.silos])
        order = np.argsort(-scores, kind="stable")
        hits = np.cumsum(labels[order])
        precision = hits / np.arange(1, len(hits) + 1)
        recall = hits / max(int(labels.sum()), 1)
        axis.plot(recall, precision, label=method, color=COLOURS.get(method))
    axis.axhline(labels.mean(), color="grey", linestyle=":", label="base rate")
    axis.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    axis.legend()
    return Figure(
        "Precision–recall, all storefronts",
        svg_of(figure),
        "Every held-out row once, ranked by each method's score.",
    )

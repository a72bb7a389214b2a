"""What a forecast is worth on the shelf: a periodic-review base-stock policy per (item, country),
simulated over the test weeks with the actual demand. Pure numpy.

Assumptions (all parameters of `InventorySettings`):
- Each week the shop reviews the item and orders up to a base-stock level; it cannot return stock,
  so when it already holds more it orders nothing. Demand it cannot serve that week is lost.
- Costs: holding `h` per unit left on hand at the end of a week, lost sales `b` per unit of demand
  not served (defaults h = 1, b = 4, stated assumptions, not the shop's numbers). The newsvendor
  critical ratio q* = b / (b + h) (0.8 by default) is the service level the policy aims at.
- Lead time 0 (default): an order placed at the start of week t arrives before that week's demand,
  and the base-stock level is the q*-quantile of week t's forecast demand. Lead time L >= 1: the
  order arrives at the start of week t + L and the level covers weeks t .. t + L; the q*-quantile
  of their sum is approximated by the sum of the weekly q*-quantiles (exact when the weeks move
  together); past the forecast horizon the last week's quantile is reused.
- Starting stock: nothing on hand at lead time 0 (the first week's order arrives in time); at lead
  time L >= 1, on hand = the base-stock level of the first L weeks, as if the policy had run before,
  and nothing in the pipeline.
- Quantiles between the forecast's levels are interpolated linearly; outside them the nearest
  level's quantile is used. Quantile forecasts below zero count as zero.
Reported: total, holding and lost-sales cost, fill rate (units served / units demanded), overall and
per country.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InventorySettings:
    holding_cost: float = 1.0  # h, per unit on hand at a week's end
    stockout_cost: float = 4.0  # b, per unit of lost sales
    lead_time: int = 0  # weeks

    @property
    def critical_ratio(self) -> float:
        return self.stockout_cost / (self.stockout_cost + self.holding_cost)


def quantile_at(quantiles: np.ndarray, levels: np.ndarray, level: float) -> np.ndarray:
    """The forecast at `level`, interpolated linearly between the levels. quantiles: (..., Q)."""
    levels = np.asarray(levels, dtype=np.float64)
    quantiles = np.sort(np.asarray(quantiles, dtype=np.float64), axis=-1)  # no crossing
    if level <= levels[0]:
        return quantiles[..., 0]
    if level >= levels[-1]:
        return quantiles[..., -1]
    j = int(np.searchsorted(levels, level, side="right"))
    w = (level - levels[j - 1]) / (levels[j] - levels[j - 1])
    return (1 - w) * quantiles[..., j - 1] + w * quantiles[..., j]


def base_stock_levels(weekly_quantile: np.ndarray, lead_time: int) -> np.ndarray:
    """Per series and week, the order-up-to level: the sum of the weekly quantiles over weeks
    t .. t + lead_time (the last week repeated past the horizon). weekly_quantile: (n, H)."""
    H = weekly_quantile.shape[1]
    padded = np.concatenate([weekly_quantile, np.repeat(weekly_quantile[:, -1:], lead_time, 1)], 1)
    return np.stack([padded[:, t : t + lead_time + 1].sum(1) for t in range(H)], axis=1)


def simulate(
    quantiles: np.ndarray,
    levels: np.ndarray,
    demand: np.ndarray,
    settings: InventorySettings | None = None,
) -> dict[str, np.ndarray]:
    """Per series (n, H) arrays: on-hand after arrivals, served, lost, end stock, and the orders.

    quantiles: (n, H, Q) forecasts at `levels`; demand: (n, H) actual units."""
    settings = settings or InventorySettings()
    demand = np.asarray(demand, dtype=np.float64)
    n, H = demand.shape
    L = settings.lead_time
    weekly = np.maximum(quantile_at(quantiles, levels, settings.critical_ratio), 0.0)
    level = base_stock_levels(weekly, L)
    # Lead time L >= 1: the stock on hand covers weeks 0 .. L-1, the first order week L onwards.
    on_hand = base_stock_levels(weekly, L - 1)[:, 0] if L > 0 else np.zeros(n)
    pipeline = np.zeros((n, L + 1))  # pipeline[:, k]: arriving k weeks from now
    out = {k: np.zeros((n, H)) for k in ("available", "served", "lost", "end", "order")}
    for t in range(H):
        position = on_hand + pipeline.sum(1)  # on hand and on order
        order = np.maximum(level[:, t] - position, 0.0)
        pipeline[:, L] += order
        on_hand = on_hand + pipeline[:, 0]
        served = np.minimum(on_hand, demand[:, t])
        out["available"][:, t] = on_hand
        out["served"][:, t] = served
        out["lost"][:, t] = demand[:, t] - served
        on_hand = on_hand - served
        out["end"][:, t] = on_hand
        out["order"][:, t] = order
        pipeline = np.concatenate([pipeline[:, 1:], np.zeros((n, 1))], axis=1)
    return out


def _summary(sim: dict[str, np.ndarray], rows: np.ndarray, settings: InventorySettings) -> dict:
    holding = settings.holding_cost * float(sim["end"][rows].sum())
    lost_units = float(sim["lost"][rows].sum())
    stockout = settings.stockout_cost * lost_units
    served = float(sim["served"][rows].sum())
    demanded = served + lost_units
    return {
        "series": int(rows.sum()),
        "total_cost": holding + stockout,
        "holding_cost": holding,
        "stockout_cost": stockout,
        "fill_rate": served / demanded if demanded > 0 else float("nan"),
        "units_demanded": demanded,
        "units_lost": lost_units,
    }


def inventory_report(
    quantiles: np.ndarray,
    levels: np.ndarray,
    demand: np.ndarray,
    country: np.ndarray,
    settings: InventorySettings | None = None,
) -> dict:
    """Costs and fill rate of the base-stock policy, overall and per country."""
    settings = settings or InventorySettings()
    sim = simulate(quantiles, levels, demand, settings)
    country = np.asarray(country, dtype=object)
    return {
        "overall": _summary(sim, np.ones(len(country), dtype=bool), settings),
        "per_country": {c: _summary(sim, country == c, settings) for c in dict.fromkeys(country)},
        "assumptions": {
            "holding_cost": settings.holding_cost,
            "stockout_cost": settings.stockout_cost,
            "critical_ratio": settings.critical_ratio,
            "lead_time_weeks": settings.lead_time,
            "policy": "periodic review, order up to the forecast's critical-ratio quantile; "
            "lost sales; start with no stock (lead time 0) or the first weeks' level",
        },
    }

"""Demand forecasting baselines on Online Retail: seasonal naive and the best statsforecast model per
series, scored by WAPE / MASE (overall, per country, smooth vs intermittent) and by the base-stock
policy's cost and fill rate over the 8 test weeks.

    python benchmarks/demand_baselines.py --out benchmarks/out [--workers 2] [--no-statistical]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedshop.data.demand import DemandSettings, load_demand
from fedshop.eval.forecast import evaluate_demand
from fedshop.eval.forecast_baselines import run_baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for demand_baselines.json")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-statistical", action="store_true", help="seasonal naive only")
    args = parser.parse_args()

    start = time.perf_counter()
    settings = DemandSettings()
    _, weekly = load_demand(settings)
    built = time.perf_counter() - start
    country = weekly.series_country
    results = {"data": weekly.report, "seconds_data": built, "methods": {}}
    forecasts = run_baselines(
        weekly.train, settings.horizon, workers=args.workers, statistical=not args.no_statistical
    )
    for name, f in forecasts.items():
        scores = evaluate_demand(f.point, f.quantiles, f.levels, weekly.test, weekly.train, country)
        results["methods"][name] = {"seconds": f.seconds, "notes": f.notes, **scores}
        acc, inv = scores["accuracy"], scores["inventory"]["overall"]
        print(
            f"{name:18s} WAPE {acc['overall']['wape']:.3f}  MASE {acc['overall']['mase']:.3f}  "
            f"(intermittent WAPE {acc['intermittent']['wape']:.3f} MASE "
            f"{acc['intermittent']['mase']:.3f})  cost {inv['total_cost']:.0f}  "
            f"fill {inv['fill_rate']:.3f}  {f.seconds:.1f} s"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "demand_baselines.json"
        path.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

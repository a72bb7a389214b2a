"""The return-risk table and the merchandiser's quality view on Online Retail: dataset sizes, how
the cancellations matched, the return rate per silo, and the items flagged at ε = 1 (noise seeds
given, so the numbers reproduce; a real release leaves the noise seed unset).

    python benchmarks/returns_quality.py --out benchmarks/out [--epsilon 1] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedshop.data.datasets import load_cleaned_retail as load_cleaned
from fedshop.data.returns import (
    ReturnsSettings,
    build_returns_dataset,
    labelled_lines,
)
from fedshop.privacy.return_quality import QualitySettings, quality_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    cleaned, settings = load_cleaned(), ReturnsSettings()
    dataset = build_returns_dataset(cleaned, settings)
    report = dataset.report
    print(f"rows: {report['rows']}  return rate: {report['return_rate']}")
    print(f"matching: {report['matching']}")
    for silo in report["silos"]:
        print(
            f"  {silo['silo']:<16} train {silo['train_rows']:>7} ({silo['train_return_rate']:.2%})"
            f"  test {silo['test_rows']:>6} ({silo['test_return_rate']:.2%})"
        )
    lines, _ = labelled_lines(cleaned, settings)
    views = {}
    for seed in args.seeds:
        view = quality_view(
            lines, epsilon=args.epsilon, noise_seed=seed, settings=QualitySettings()
        )
        flagged = view.flagged
        print(
            f"noise seed {seed}: overall rate {view.overall_rate:.4f}, threshold "
            f"{view.threshold:.4f}, {len(flagged)} flagged of {view.report['tested_items']} tested, "
            f"{view.report['confirmed_items']} confirmed"
        )
        for row in flagged.itertuples():
            print(
                f"    {row.item_id:<7} {row.name:<36} {row.rate:.3f} [{row.low:.3f}, {row.high:.3f}]"
                f"{'  confirmed' if row.confirmed else ''}"
            )
        views[seed] = {"report": view.report, "flagged": flagged.to_dict(orient="records")}
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "dataset": {k: v for k, v in report.items() if k not in ("features", "cleaning_rules")},
        "quality_view": views,
    }
    path = args.out / "returns_quality.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"written: {path}")


if __name__ == "__main__":
    main()

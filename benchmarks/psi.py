"""Which PSI protocol to align customers with, and what it costs (secure/psi.py).

1. Every candidate at 100k × 100k ids, half of each side shared, side by side in one run: spu's
   RR22, KKRT and ECDH (Curve25519, and FourQ for the curve choice) over spu's brpc link on
   127.0.0.1, and openmined-psi's ECDH (P-256) as messages. Both parties run on this machine
   (`local_psi`: a child process each for spu; openmined's two sides one after the other in this
   process), so on 2 cores they share the CPU as two machines would not. "seconds" is `local_psi`
   end to end (encoding the ids, CSV files, starting the session processes, connecting, the
   protocol, mapping the result back), the median of the repeats; "protocol s" is the protocol
   alone (the slower party's, from the connected link to its result). Bytes each way are counted
   by the TCP relay `local_psi` puts between the parties (`CountingRelay`); openmined's are its
   message sizes.
2. The chosen protocol (the default, RR22) at 1M × 1M: `seconds_1m` (target ≤ 10 s on 2 cores) and
   `mb_1m` (MB sent by the label holder + by the feature holder).

`speedup_vs_openmined` = openmined seconds / the chosen protocol's seconds, at 100k.

    python benchmarks/psi.py --out benchmarks/out [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedshop.secure import psi_spu
from fedshop.secure.psi import DEFAULT_PROTOCOL, local_psi, psi_available

console = Console()

# (row name, protocol, spu ECDH curve)
CANDIDATES = [
    ("spu rr22", "rr22", None),
    ("spu kkrt", "kkrt", None),
    ("spu ecdh (25519)", "ecdh", "CURVE_25519"),
    ("spu ecdh (FourQ)", "ecdh", "CURVE_FOURQ"),
    ("openmined ecdh (P-256)", "openmined", None),
]


def id_sets(n: int) -> tuple[list[str], list[str]]:
    """n ids each, half shared."""
    label = [f"customer-{i:09d}" for i in range(n)]
    feature = [f"customer-{i:09d}" for i in range(n // 2, n // 2 + n)]
    return label, feature


def measure(protocol: str, curve: str | None, n: int, repeats: int) -> dict:
    label_ids, feature_ids = id_sets(n)
    saved = psi_spu.ECDH_CURVE
    if curve:
        psi_spu.ECDH_CURVE = curve
    try:
        walls, protocol_seconds = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            ours, theirs = local_psi(label_ids, feature_ids, protocol)
            walls.append(time.perf_counter() - started)
            protocol_seconds.append(max(ours.seconds, theirs.seconds))
            assert ours.intersection_size == n - n // 2, ours.intersection_size
    finally:
        psi_spu.ECDH_CURVE = saved
    return {
        "protocol": protocol,
        "curve": curve,
        "ids_each": n,
        "intersection": ours.intersection_size,
        "repeats": repeats,
        "seconds": statistics.median(walls),
        "seconds_all": walls,
        "protocol_seconds": statistics.median(protocol_seconds),
        "mb_label_to_feature": ours.bytes_sent / 1e6,
        "mb_feature_to_label": ours.bytes_received / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--quick", action="store_true", help="10k and 100k ids, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n_small, n_large = (10_000, 100_000) if args.quick else (100_000, 1_000_000)

    load_before = os.getloadavg()[0]
    rows = []
    for name, protocol, curve in CANDIDATES:
        if not psi_available(protocol):
            console.print(f"[yellow]{name}: not installed, skipped[/]")
            continue
        # openmined takes tens of seconds at 100k: one run.
        repeats = 1 if protocol == "openmined" else args.repeats
        with console.status(f"{name}, {n_small:,} × {n_small:,}…"):
            rows.append({"name": name, **measure(protocol, curve, n_small, repeats)})
    table = Table(title=f"PSI, {n_small:,} × {n_small:,} ids, half shared (median of the repeats)")
    for column in ("protocol", "repeats", "seconds", "protocol s", "MB label→feature",
                   "MB feature→label"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["name"], str(r["repeats"]), f"{r['seconds']:.2f}", f"{r['protocol_seconds']:.2f}",
            f"{r['mb_label_to_feature']:.2f}", f"{r['mb_feature_to_label']:.2f}",
        )  # fmt: skip
    console.print(table)

    chosen = next(r for r in rows if r["protocol"] == DEFAULT_PROTOCOL)
    with console.status(f"{chosen['name']}, {n_large:,} × {n_large:,}…"):
        large = measure(DEFAULT_PROTOCOL, None, n_large, args.repeats)
    mb_large = large["mb_label_to_feature"] + large["mb_feature_to_label"]
    openmined = next((r for r in rows if r["protocol"] == "openmined"), None)
    speedup = openmined["seconds"] / chosen["seconds"] if openmined else None
    console.print(
        f"{chosen['name']} at {n_large:,} × {n_large:,}: {large['seconds']:.2f} s end to end "
        f"(protocol {large['protocol_seconds']:.2f} s; runs {', '.join(f'{s:.2f}' for s in large['seconds_all'])}), "
        f"{large['mb_label_to_feature']:.1f} MB label→feature + {large['mb_feature_to_label']:.1f} MB "
        f"feature→label. Target ≤ 10 s: {'met' if large['seconds'] <= 10 else 'NOT met'}."
    )
    if speedup:
        console.print(f"{chosen['name']} is {speedup:.0f}× faster than openmined at {n_small:,}.")

    load_after = os.getloadavg()[0]
    console.print(
        f"Load average (1 min) before / after: {load_before:.1f} / {load_after:.1f} on "
        f"{os.cpu_count()} cores (above 0 means other work shared the CPU)"
    )
    document = {
        "chosen": DEFAULT_PROTOCOL,
        "ecdh_curve": psi_spu.ECDH_CURVE,
        "ids_each_small": n_small,
        "ids_each_large": n_large,
        "seconds_1m": large["seconds"],
        "protocol_seconds_1m": large["protocol_seconds"],
        "mb_1m": mb_large,
        "target_seconds_1m": 10.0,
        "target_met": large["seconds"] <= 10.0,
        "speedup_vs_openmined": speedup,
        "candidates": rows,
        "large": large,
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before, load_after],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "psi.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"Wrote {path}")


if __name__ == "__main__":
    main()

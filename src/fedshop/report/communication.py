"""What a run's rounds cost on the wire and on the simulated clock: metrics.json "communication" and
its report section (HR@10 against bytes sent and against simulated time)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt

from fedshop.config import RunConfig
from fedshop.fl.rounds import RoundRecord
from fedshop.report.figures import svg_of


def communication_block(history: Sequence[RoundRecord], config: RunConfig) -> dict[str, Any]:
    """Totals over the run, each party's totals (where rounds name their parties), and per round
    the cumulative bytes, the simulated clock and HR@10 where the round was evaluated."""
    com = config.communication
    block: dict[str, Any] = {
        "codec": com.codec,
        "error_feedback": com.error_feedback and com.codec == "topk",
        "low_rank": com.low_rank,
        "schedule": com.schedule,
        "client_speeds": com.client_speeds,
    }
    measured = [r for r in history if r.traffic is not None]
    if not measured:
        block["bytes"] = None
        return block
    sent = received = 0
    parties: dict[str, dict[str, int]] = {}
    curve = []
    for record in measured:
        traffic = record.traffic
        sent += traffic["sent"]
        received += traffic["received"]
        for name, moved in traffic.get("parties", {}).items():
            party = parties.setdefault(name, {"sent": 0, "received": 0})
            party["sent"] += moved["sent"]
            party["received"] += moved["received"]
        point = {"round": record.round, "sent": sent, "total": sent + received}
        if record.clock is not None:
            point["clock"] = round(record.clock, 3)
        if record.metrics is not None and "hr@10" in record.metrics:
            point["hr@10"] = record.metrics["hr@10"]
        curve.append(point)
    block.update(
        source=measured[-1].traffic["source"],
        bytes={"sent": sent, "received": received, "total": sent + received},
        per_party=parties or None,
        curve=curve,
    )
    if measured[-1].clock is not None:
        block["simulated_seconds"] = round(measured[-1].clock, 3)
    return block


def _megabytes(value: float) -> str:
    return f"{value / 1e6:,.2f} MB"


def curves_svg(curve: Sequence[dict[str, Any]]) -> str:
    """HR@10 against cumulative bytes sent, and against the simulated clock."""
    points = [p for p in curve if "hr@10" in p]
    timed = [p for p in points if "clock" in p]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(9, 3.6), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot([p["sent"] / 1e6 for p in points], [p["hr@10"] for p in points], marker="o", ms=3)
    ax.set_xlabel("bytes the clients sent, cumulative (MB)")
    ax.set_ylabel("HR@10")
    ax.grid(alpha=0.3)
    if timed:
        ax = axes[0][1]
        ax.plot([p["clock"] for p in timed], [p["hr@10"] for p in timed], marker="o", ms=3)
        ax.set_xlabel("simulated wall-clock time (s)")
        ax.set_ylabel("HR@10")
        ax.grid(alpha=0.3)
    return svg_of(fig)


def communication_section(block: dict[str, Any] | None) -> str:
    if not block or not block.get("bytes"):
        return "<p>No round reported its bytes.</p>"
    totals = block["bytes"]
    how = (
        "measured on the Flower messages"
        if block.get("source") == "flower"
        else "the encoded size of every message (simulator)"
    )
    settings = (
        f"codec <b>{html.escape(block['codec'])}</b>"
        + (" with error feedback" if block.get("error_feedback") else "")
        + (f" · low-rank item updates, rank {block['low_rank']}" if block.get("low_rank") else "")
        + f" · schedule <b>{html.escape(block['schedule'])}</b>"
        + f" · client speeds {html.escape(block['client_speeds'])}"
    )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_megabytes(p['sent'])}</td>"
        f"<td>{_megabytes(p['received'])}</td></tr>"
        for name, p in sorted((block.get("per_party") or {}).items())
    )
    parties = (
        "<table><tr><th>party</th><th>sent</th><th>received</th></tr>" + rows + "</table>"
        if rows
        else "<p class='muted'>Too many parties to list; the history keeps each round's totals, "
        "mean and largest.</p>"
    )
    clock = (
        f" The rounds took {block['simulated_seconds']:,.1f} simulated seconds."
        if "simulated_seconds" in block
        else ""
    )
    curve = block.get("curve", [])
    plots = curves_svg(curve) if any("hr@10" in p for p in curve) else ""
    return (
        f"<p>{settings}. Bytes are {how}: the clients sent {_megabytes(totals['sent'])} and received "
        f"{_megabytes(totals['received'])} in all.{clock}</p>{parties}{plots}"
    )

"""Matplotlib figures as inline SVG for the HTML reports."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display: render straight to SVG
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def svg_of(figure: Figure) -> str:
    """`figure` as an inline <svg> element (no XML prologue), then closed; laid out tightly unless
    it has a layout engine of its own."""
    buffer = io.StringIO()
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    svg = buffer.getvalue()
    return svg[svg.find("<svg") :]

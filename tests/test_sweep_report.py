"""The HTML report of a privacy–utility sweep, rendered with real matplotlib."""

import copy
import re

from fedshop.report.sweep_html import render_sweep_report, write_sweep_report

DELTA = 1.7e-05


def point(epsilon, z, hr, ndcg, auc, seconds):
    private = epsilon is not None
    return {
        "epsilon": epsilon,
        "delta": DELTA if private else None,
        "noise_multiplier": z,
        "hr@10": hr,
        "ndcg@10": ndcg,
        "mia_auc": auc,
        "seconds": seconds,
    }


SWEEP = {
    "dataset": "movielens-1m",
    "mode": "cross-device",
    "model": "mf-bpr",
    "protocol": "sampled-100",
    "unit": "shopper (all of one user's interactions)",
    "accountant": "rdp",
    "mechanism": "DP-FedAvg (Gaussian, Poisson sampling)",
    "delta": DELTA,
    "seed": 1,
    "rounds": 30,
    # Deliberately out of order, the non-private run first, one private AUC missing.
    "points": [
        point(None, None, 0.80, 0.53, 0.56, 80.0),
        point(8.0, 0.7, 0.73, 0.47, 0.53, 93.0),
        point(0.5, 3.1, 0.41, 0.22, 0.50, 95.0),
        point(2.0, 1.3, 0.62, 0.38, None, 94.0),
        point(1.0, 2.0, 0.52, 0.30, 0.51, 96.0),
        point(4.0, 0.9, 0.70, 0.45, 0.52, 92.0),
    ],
    "popularity": {"hr@10": 0.55, "ndcg@10": 0.33},
}


def body_rows(page: str) -> list[list[str]]:
    tbody = page[page.index("<tbody>") : page.index("</tbody>")]
    rows = re.findall(r"<tr>(.*?)</tr>", tbody)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]


def test_report_has_figure_and_sorted_table():
    page = render_sweep_report(SWEEP)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<svg" in page
    assert "How to read this" in page
    for text in ("movielens-1m", "cross-device", "mf-bpr", "sampled-100", "rdp", "1.7e-05"):
        assert text in page
    rows = body_rows(page)
    assert [row[0] for row in rows] == ["0.5", "1", "2", "4", "8", "∞"]
    by_epsilon = {row[0]: row for row in rows}
    # HR@10 relative to non-private: 0.62 / 0.80 = 77.5 %.
    assert by_epsilon["2"][5] == "77.5 %"
    assert by_epsilon["∞"][5] == "100.0 %"
    assert by_epsilon["2"][6] == "–"  # missing AUC
    assert by_epsilon["0.5"][2] == "3.10" and by_epsilon["0.5"][3] == "0.4100"
    assert by_epsilon["∞"][1] == "–" and by_epsilon["∞"][2] == "–"


def test_strings_from_the_json_are_escaped():
    sweep = copy.deepcopy(SWEEP)
    sweep["dataset"] = "<b>evil</b>"
    sweep["unit"] = "customer & <script>alert(1)</script>"
    page = render_sweep_report(sweep)
    assert "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "<b>evil</b>" not in page
    assert "<script>" not in page and "customer &amp; &lt;script&gt;" in page


def test_report_without_popularity_or_any_auc():
    sweep = copy.deepcopy(SWEEP)
    del sweep["popularity"]
    for p in sweep["points"]:
        p["mia_auc"] = None
    page = render_sweep_report(sweep)
    assert "<svg" in page
    rows = body_rows(page)
    assert len(rows) == 6 and all(row[6] == "–" for row in rows)


def test_write_sweep_report(tmp_path):
    path = write_sweep_report(SWEEP, tmp_path)
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")
    assert "<svg" in text and "∞" in text


def test_a_sweep_with_a_known_noise_seed_says_it_is_not_private():
    assert "Not private: noise seed known" not in render_sweep_report(SWEEP)
    assert "Not private: noise seed known" in render_sweep_report(
        {**SWEEP, "noise_seed_known": True}
    )

"""Cross-border insight: storefronts' counts released under DP, paid from the ledger, and the lifts
with their intervals (`privacy/insight.py`, `serve/insight.py`, `fedshop insight`). Real data
(Online Retail), real files, a real SQLite ledger."""

import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import norm

from fedshop.errors import DataError
from fedshop.privacy import insight as maths
from fedshop.seeding import NoiseStream
from fedshop.serve.insight import INSIGHT, release_insight
from fedshop.storage.ledger import BudgetExceededError, Ledger
from serving_runs import copy_run


@pytest.fixture
def run(tmp_path):
    """A real run folder (`fedshop train` on Online Retail, one silo per country), with each
    storefront's private history file `models/federated/silo-<slug>.customers.npz`."""
    return copy_run("retail-mf-cross-silo", tmp_path / "run")


@pytest.fixture
def ledger_url(tmp_path):
    return f"sqlite:///{tmp_path / 'ledger.sqlite'}"


def histories_of(dataset, index):
    silo = dataset.silo(index)
    return maths.Histories(
        np.asarray(dataset.user_ids[silo.users]).astype(str),
        silo.train.indptr.astype(np.int64),
        silo.train.indices.astype(np.int64),
    )


def true_counts(dataset, max_items, seed=0):
    item_ids = [str(i) for i in dataset.item_ids]
    customers = np.array([dataset.silo(s).n_users for s in range(dataset.n_silos)], float)
    counts = np.stack(
        [
            maths.item_customer_counts(histories_of(dataset, s), item_ids, max_items, seed)
            for s in range(dataset.n_silos)
        ]
    )
    return customers, counts


# --- the release and what it costs ---------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("epsilon", [0.5, 1.0, 8.0])
def test_the_release_costs_the_requested_epsilon(accountant, epsilon):
    delta = 1 / (10 * 4334)
    z = maths.noise_multiplier_for(epsilon, delta, accountant)
    spent = maths.event_epsilon(maths.gaussian_event(z), delta, accountant)
    assert spent == pytest.approx(epsilon, rel=1e-3) and spent <= epsilon * (1 + 1e-9)
    if accountant == "pld":
        # PLD is tight for one Gaussian: at z the exact δ(ε) of the Gaussian mechanism (Balle &
        # Wang 2018, sensitivity 1, σ = z) is the δ asked for.
        exact = norm.cdf(1 / (2 * z) - epsilon * z) - math.exp(epsilon) * norm.cdf(
            -1 / (2 * z) - epsilon * z
        )
        assert exact == pytest.approx(delta, rel=0.01)


def test_one_release_is_one_gaussian_at_the_calibrated_noise(retail):
    item_ids = [str(i) for i in retail.item_ids]
    z = maths.noise_multiplier_for(1.0, 1e-5, "rdp")
    release = maths.release_counts(histories_of(retail, 2), item_ids, 20, z, NoiseStream.secret())
    assert release.event == maths.gaussian_event(z)
    assert release.sensitivity == pytest.approx(math.sqrt(21))
    assert release.scale == pytest.approx(z * math.sqrt(21))
    assert maths.event_epsilon(release.event, 1e-5, "rdp") == pytest.approx(1.0, rel=1e-3)


def test_noise_is_secret_unless_a_seed_is_named(retail):
    item_ids = [str(i) for i in retail.item_ids]
    germany = histories_of(retail, 2)

    def release(stream):
        return maths.release_counts(germany, item_ids, 20, 2.0, stream)

    first, second = release(NoiseStream.secret()), release(NoiseStream.secret())
    assert not np.array_equal(first.item_counts, second.item_counts)
    assert first.customers != second.customers
    seeded = [release(NoiseStream.of(7, "insight", "germany")) for _ in range(2)]
    assert np.array_equal(seeded[0].item_counts, seeded[1].item_counts)
    # The noise is there: σ ≈ 2·√21 on 3,645 items.
    noise = seeded[0].item_counts - maths.item_customer_counts(germany, item_ids, 20, 0)
    assert np.std(noise) == pytest.approx(2.0 * math.sqrt(21), rel=0.05)


def test_one_customer_moves_the_release_by_at_most_the_sensitivity(retail):
    """Add-or-remove-one customer: the noise-free vector (N_s, c_s) moves by √(min(m, k) + 1) for
    a customer with m items, never more than √(k + 1), and no other customer's kept items change."""
    item_ids = [str(i) for i in retail.item_ids]
    max_items = 20
    germany = histories_of(retail, 2)
    sizes = np.diff(germany.indptr)
    full = np.concatenate(
        [[germany.n_customers], maths.item_customer_counts(germany, item_ids, max_items, 3)]
    )
    heaviest = int(np.argmax(sizes))
    assert sizes[heaviest] > 5 * max_items  # a customer who bought far more than the bound
    for row in {heaviest, int(np.argmin(sizes)), 0, 17, germany.n_customers - 1}:
        keep = np.ones(len(germany.items), bool)
        keep[germany.indptr[row] : germany.indptr[row + 1]] = False
        without = maths.Histories(
            np.delete(germany.customer_ids, row),
            np.concatenate([[0], np.cumsum(np.delete(sizes, row))]),
            germany.items[keep],
        )
        reduced = np.concatenate(
            [[without.n_customers], maths.item_customer_counts(without, item_ids, max_items, 3)]
        )
        moved = np.abs(full - reduced)
        assert set(np.unique(moved)) <= {0.0, 1.0}
        assert np.linalg.norm(moved) == pytest.approx(math.sqrt(min(sizes[row], max_items) + 1))
        assert np.linalg.norm(moved) <= maths.sensitivity(max_items) + 1e-12


def test_a_customer_counts_once_per_item_and_for_at_most_max_items():
    item_ids = [f"item-{i}" for i in range(300)]
    bought = np.concatenate([np.arange(300), np.arange(300)])  # everything, twice
    heavy = maths.Histories(np.array(["c1"]), np.array([0, 600]), bought)
    counts = maths.item_customer_counts(heavy, item_ids, 7, seed=1)
    assert counts.sum() == 7 and set(np.unique(counts)) == {0.0, 1.0}
    # Another customer with the same purchases keeps another subset; the same one, the same.
    other = maths.Histories(np.array(["c2"]), np.array([0, 600]), bought)
    assert not np.array_equal(counts, maths.item_customer_counts(other, item_ids, 7, seed=1))
    assert np.array_equal(counts, maths.item_customer_counts(heavy, item_ids, 7, seed=1))
    # Over many heavy customers every item is kept about equally often (no catalogue-order bias).
    many = maths.Histories(
        np.array([f"c{k}" for k in range(2000)]),
        np.arange(0, 2001 * 300, 300)[:2001],
        np.tile(np.arange(300), 2000),
    )
    kept = maths.item_customer_counts(many, item_ids, 30, seed=1)
    assert kept.sum() == 2000 * 30
    assert abs(kept[:150].sum() - kept[150:].sum()) < 4 * math.sqrt(kept.sum())
    with pytest.raises(Exception, match="outside the catalogue"):
        maths.item_customer_counts(
            maths.Histories(np.array(["c"]), np.array([0, 1]), np.array([300])), item_ids, 5, 0
        )


# --- the lift and its interval -------------------------------------------------------------------


def test_lift_of_the_true_counts():
    customers = np.array([100.0, 300.0])
    counts = np.array([[50.0, 10.0], [50.0, 30.0]])
    # Item 0: half of storefront 0 vs 100/400 of the shop: lift 2. Item 1: 0.1 everywhere: 1.
    assert maths.lifts(customers, counts) == pytest.approx(np.array([[2.0, 1.0], [2 / 3, 1.0]]))


def test_intervals_cover_the_true_lift_on_real_counts(retail):
    """Repeated simulated releases of the real (bounded) Online Retail counts at ε = 8 per
    storefront (where Germany, France and the rest of the world list items).

    1. Fixed cells (the 290 whose true counts clear the listing rule): each 90% interval covers
       the true lift in 90.7% of 200 releases (measured); the cells share N and C_i within a
       release, so the pooled rate varies more than a binomial's ±0.2% would: tolerance ±3%.
    2. The items `over_indexing` lists (chosen on one view, measured on the other): measured 0.91
       pooled and 0.90 outside the UK, over 1,647 listed (item, release) pairs, 647 outside the UK.
       A binomial SE at 0.9 is 0.007 (0.012 outside the UK); listed items share a release's
       noise, so we allow 5 SE or more: [0.85, 0.95], and ≥ 0.85 outside the UK.
    3. Control: choosing and measuring on the same values (no fission), the listed items'
       intervals outside the UK cover only 65% (measured): below 0.8 here, which shows that the
       test above can fail."""
    customers, counts = true_counts(retail, 20)
    truth = maths.lifts(customers, counts)
    delta = 1 / (10 * customers.sum())
    sigma = maths.noise_multiplier_for(8.0, delta, "pld") * maths.sensitivity(20)
    scale = np.full(len(customers), sigma)
    threshold = maths.listing_threshold(counts.size)
    fixed = maths.candidates(customers, counts, scale, threshold)
    fixed_cells = [(int(s), int(i)) for s, i in zip(*np.nonzero(fixed), strict=True)]
    fixed_truth = np.array([truth[c] for c in fixed_cells])
    assert len(fixed_cells) > 200 and any(s != 0 for s, _ in fixed_cells)
    rng = np.random.default_rng(2024)
    fixed_hits = 0
    listed = {"uk": [0, 0], "other": [0, 0], "no-fission": [0, 0]}
    for release in range(200):
        noisy_customers = customers + sigma * rng.standard_normal(customers.shape)
        noisy_counts = counts + sigma * rng.standard_normal(counts.shape)
        intervals = maths.lift_intervals(noisy_customers, noisy_counts, scale, fixed_cells)
        fixed_hits += int(
            np.sum((intervals[:, 0] <= fixed_truth) & (fixed_truth <= intervals[:, 1]))
        )
        if release >= 100:
            continue
        shown = maths.over_indexing(noisy_customers, noisy_counts, scale, top=10, seed=release)
        for entry in (e for entries in shown for e in entries):
            tally = listed["uk" if entry.silo == 0 else "other"]
            tally[0] += entry.interval[0] <= truth[entry.silo, entry.item] <= entry.interval[1]
            tally[1] += 1
        # Control: the same values choose and measure.
        same = maths.candidates(noisy_customers, noisy_counts, scale, threshold)
        for s in range(1, len(customers)):
            cells = [(s, int(i)) for i in np.flatnonzero(same[s])]
            if not cells:
                continue
            ends = maths.lift_intervals(noisy_customers, noisy_counts, scale, cells)
            for (_, i), (low, high) in sorted(
                zip(cells, ends, strict=True), key=lambda pair: -pair[1][0]
            )[:10]:
                listed["no-fission"][0] += low <= truth[s, i] <= high
                listed["no-fission"][1] += 1
    fixed_rate = fixed_hits / (200 * len(fixed_cells))
    assert 0.87 <= fixed_rate <= 0.94, fixed_rate
    pooled = (listed["uk"][0] + listed["other"][0]) / (listed["uk"][1] + listed["other"][1])
    other = listed["other"][0] / listed["other"][1]
    assert listed["other"][1] >= 200, listed
    assert 0.85 <= pooled <= 0.95, listed
    assert other >= 0.85, listed
    control = listed["no-fission"][0] / listed["no-fission"][1]
    assert control < 0.8, listed


def test_small_counts_are_not_listed():
    """Pure noise clears the listing threshold about NOISE_ONLY_LISTINGS times per table."""
    rng = np.random.default_rng(5)
    shape = (11, 3645)
    scale = np.full(11, 3.0)
    listed = 0
    for seed in range(20):
        customers = np.full(11, 500.0) + 3.0 * rng.standard_normal(11)
        counts = 3.0 * rng.standard_normal(shape)  # nobody bought anything
        listed += sum(len(e) for e in maths.over_indexing(customers, counts, scale, 10, seed=seed))
    assert listed <= 3  # expected 0.1 a table at the choosing view's σ, 2 over 20 tables


# --- the command's work: ledger, files ------------------------------------------------------------


def test_insight_json_holds_each_storefronts_items_and_the_cost(run, ledger_url, retail):
    document = release_insight(run, epsilon=8.0, ledger_url=ledger_url, budget=100, noise_seed=3)
    on_disk = json.loads((run / INSIGHT).read_text())
    assert on_disk == document
    assert stat.S_IMODE(os.stat(run / INSIGHT).st_mode) & 0o044  # public: the page shows it
    n = sum(s["customers"] for s in retail.report["silos"])
    assert document["delta"] == pytest.approx(1 / (10 * n))
    assert document["epsilon"] == pytest.approx(8.0, rel=1e-3)
    assert document["accountant"] == "pld" and document["max_items"] == 20
    assert document["sigma"] == pytest.approx(document["noise_multiplier"] * math.sqrt(21))
    assert document["noise_seed_known"] is True
    assert [s["name"] for s in document["storefronts"]] == list(retail.silo_names)
    names = dict(zip(map(str, retail.item_ids), map(str, retail.item_names), strict=True))
    listed = {s["name"]: s["items"] for s in document["storefronts"]}
    assert 1 <= len(listed["United Kingdom"]) <= 10
    assert listed["Germany"], "at ε = 8 Germany's strongest items clear the noise"
    for items in listed.values():
        for item in items:
            assert names[item["item_id"]] == item["name"]
            low, high = item["interval"]
            assert low <= item["lift"] <= high and item["chosen_lift"] > 1
    # Tiny storefronts (10–30 customers) list nothing at this σ.
    assert listed["Norway"] == [] and listed["Italy"] == []
    # The ledger holds each storefront's spend, the accountant's ε.
    ledger = Ledger(ledger_url)
    for name in retail.silo_names:
        assert ledger.balance(name, "online-retail").spent_epsilon == pytest.approx(
            document["epsilon"]
        )
    # The same noise seed gives the same release (and says so); no seed gives another.
    again = release_insight(run, epsilon=8.0, ledger_url=ledger_url, noise_seed=3)
    assert again["storefronts"] == document["storefronts"]
    secret = release_insight(run, epsilon=8.0, ledger_url=ledger_url)
    assert secret["noise_seed_known"] is False
    assert secret["storefronts"][0]["customers"] != document["storefronts"][0]["customers"]


def test_the_ledger_refuses_an_overspend_before_anything_is_released(run, ledger_url):
    ledger = Ledger(ledger_url)
    ledger.set_budget("United Kingdom", "online-retail", 5.0, 1e-4)
    ledger.set_budget("Germany", "online-retail", 0.5, 1e-4)
    with pytest.raises(BudgetExceededError, match=r"Germany.*needs ε = 1.*only 0.5 .* is left"):
        release_insight(run, epsilon=1.0, ledger_url=ledger_url, budget=10)
    assert not (run / INSIGHT).exists()
    assert all(b.spent_epsilon == 0 and b.runs == 0 for b in ledger.balances())
    # The storefronts without a budget did not get one either: the refusal came first.
    assert ledger.balance("France", "online-retail").budget_epsilon is None
    # Without --budget a storefront without one is refused by name.
    with pytest.raises(BudgetExceededError, match=r"no privacy budget .* 'United Kingdom'"):
        release_insight(run, epsilon=1.0, ledger_url=f"sqlite:///{run.parent / 'other.sqlite'}")
    # A release that fits spends; the next one that would pass the budget is refused.
    ledger.set_budget("Germany", "online-retail", 5.0, 1e-4)
    release_insight(run, epsilon=3.0, ledger_url=ledger_url, budget=10)
    assert ledger.balance("Germany", "online-retail").spent_epsilon == pytest.approx(3.0, rel=1e-3)
    first = (run / INSIGHT).read_bytes()
    with pytest.raises(BudgetExceededError, match="United Kingdom"):
        release_insight(run, epsilon=3.0, ledger_url=ledger_url)
    assert (run / INSIGHT).read_bytes() == first


def test_a_broken_history_file_stops_the_release_before_any_spend(run, ledger_url):
    (run / "models" / "federated" / "silo-france.customers.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"silo-france\.customers\.npz"):
        release_insight(run, epsilon=1.0, ledger_url=ledger_url, budget=10)
    assert Ledger(ledger_url).balances() == [] and not (run / INSIGHT).exists()


# --- the command line ----------------------------------------------------------------------------


def fedshop(*args, ledger):
    env = {**os.environ, "FEDSHOP_LEDGER_URL": ledger, "COLUMNS": "100"}
    return subprocess.run(
        [sys.executable, "-m", "fedshop", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def assert_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_prints_each_storefronts_items_and_the_cost(run, ledger_url):
    result = fedshop("insight", run, "--epsilon", "8", "--budget", "20", ledger=ledger_url)
    assert result.returncode == 0, result.stderr
    assert "Germany: over-indexing items" in result.stdout
    assert "90% interval" in result.stdout
    assert "No item's count clears the noise" in result.stdout and "Norway" in result.stdout
    assert "ε = 8" in result.stdout and "insight.json" in result.stdout
    assert "Not private" not in result.stdout
    seeded = fedshop(
        "insight", run, "--epsilon", "1", "--noise-seed", "4", "--accountant", "rdp",
        ledger=ledger_url,
    )  # fmt: skip
    assert seeded.returncode == 0 and "Not private: noise seed known" in seeded.stdout
    assert json.loads((run / INSIGHT).read_text())["noise_seed_known"] is True


def test_cli_errors_are_one_line(run, tmp_path, ledger_url):
    assert_error(fedshop("insight", tmp_path / "nowhere", ledger=ledger_url), "not found")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert_error(fedshop("insight", bare, ledger=ledger_url), "not a finished run folder")
    (run / "models" / "federated" / "silo-germany.customers.npz").unlink()
    assert_error(
        fedshop("insight", run, "--budget", "10", ledger=ledger_url),
        "no purchase histories for 'Germany'",
        "silo-germany.customers.npz",
    )


def test_cli_refuses_an_overspend_naming_the_storefront(run, ledger_url):
    Ledger(ledger_url).set_budget("France", "online-retail", 0.25, 1e-4)
    result = fedshop(
        "insight", run, "--epsilon", "1", "--budget", "10", "--accountant", "rdp",
        ledger=ledger_url,
    )  # fmt: skip
    assert_error(result, "France", "left", "nothing was released")
    assert not (run / INSIGHT).exists()
    assert_error(fedshop("insight", run, "--top", "0", ledger=ledger_url), "--top")

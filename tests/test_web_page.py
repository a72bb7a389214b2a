"""The shopping guide's web page, in a real Chromium (Debian's package) driven by Playwright.

The app is the real one (`create_app` over `ServingModel.load`), served by uvicorn on 127.0.0.1,
over run folders trained here: a small MF run under record-level DP with its baselines (the page's
walk-through and the operator view) and GMF and NeuMF runs (the fold-in parity). Screenshots go to
$FEDSHOP_TEST_ARTIFACTS, else the test's temporary folder; each test prints where.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.experiment import run_experiment
from fedshop.models.fold_in import FoldInSettings, fold_in, interaction_vectors, settings_for
from fedshop.report.run_folder import write_run
from fedshop.serve.app import create_app
from fedshop.serve.model import Query, ServingModel, because, catalogue_scores, top_k_excluding
from fedshop.serve.web import bundle_of, decode_bundle

# Small and fast: a real federated training, but few steps (the page's maths does not need a good
# model, only a trained one). Online Retail from the copy inside the package: no download, no data
# folder needed.
COMMON = {
    "seed": 1,
    "data.source": "embedded",
    "data.max_silos": 4,
    "model.dim": 16,
    "train.batch_size": 16384,
    "train.min_batches_per_epoch": 2,
    "federated.personalise_epochs": 0,
}
RUNS = {
    # The walk-through's run: record-level DP (so the operator view has ε and a ledger to show) and
    # the baselines the curve is drawn against.
    "mf-dp": {
        "model.name": "mf-bpr",
        "methods": ["federated", "centralized", "popularity"],
        "federated.rounds": 2,
        "privacy.mode": "record",
        "privacy.epsilon": 8.0,
        "privacy.budget": 100.0,
        "privacy.local_steps": 3,
    },
    # Parity runs: one round each.
    "gmf": {"model.name": "gmf", "methods": ["federated"], "federated.rounds": 1},
    # A narrower NeuMF (its tower costs most of the module's training): still two ReLU layers to
    # back-propagate through.
    "neumf": {
        "model.name": "neumf",
        "model.dim": 8,
        "model.mlp_layers": 2,
        "methods": ["federated"],
        "federated.rounds": 1,
    },
}
K = 10


# ---- fixtures: the browser, the runs, the servers -----------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (a browser download from Playwright's servers cannot work here). Missing: a
    skip with one line, a failure under CI (.ci/run installs it)."""
    path = shutil.which("chromium")
    message = ""
    if path is None:
        message = "chromium not found: the page's tests need it (Debian: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            message = "playwright not installed: pip install -e '.[dev]'"
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # As root (CI, containers) Chromium refuses to start without --no-sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=chromium, args=args, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("FEDSHOP_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Torch on one thread, as `fedshop serve` runs it: these models' operations are small, and
    on a busy 2-core machine a second thread made the module's training several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """Three real trained run folders in one runs folder; the DP run's ledger beside it."""
    root = tmp_path_factory.mktemp("runs")
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    dataset = None
    for name, overrides in RUNS.items():
        extra = {"privacy.ledger_url": f"sqlite:///{ledger}"} if name == "mf-dp" else {}
        config = load_config(overrides={**COMMON, **overrides, **extra})
        dataset = dataset or load_dataset(config.data, seed=config.seed)
        (root / name).mkdir()
        write_run(root / name, run_experiment(config, dataset))
    return root


@contextmanager
def serve(app) -> Iterator[str]:
    """The app on a free port of 127.0.0.1, in a uvicorn server on a thread of this process."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture(scope="module")
def servers(runs_root) -> Iterator[dict[str, tuple[str, ServingModel]]]:
    """One server per run (every storefront served), each listing the whole runs folder."""
    with (
        serve_run(runs_root, "mf-dp") as mf,
        serve_run(runs_root, "gmf") as gmf,
        serve_run(runs_root, "neumf") as neumf,
    ):
        yield {"mf-bpr": mf, "gmf": gmf, "neumf": neumf}


@contextmanager
def serve_run(root: Path, name: str, silo: str | None = None):
    model = ServingModel.load(root / name, silo)
    with serve(create_app(model, root)) as url:
        yield url, model


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def open_page(page, url: str) -> float:
    """Load the page and wait until it has downloaded the model; returns the download's ms."""
    page.goto(url)
    page.wait_for_selector("body[data-ready='true']", state="attached")
    page.wait_for_selector("#model-status[data-ready='true']", state="attached")
    return page.evaluate("async () => (await window.FedShopPage.model).loadMilliseconds")


# ---- the maths: the page's fold-in against fedshop.models.fold_in ---------------------------------------

JS_RECOMMEND = """async ([ids, silo, k, steps]) => {
  const model = await window.FedShopPage.model;
  const settings = {...model.settings, steps};
  const answer = model.recommend(ids, silo, k, settings);
  const user = {};
  for (const [name, value] of Object.entries(answer.user)) user[name] = Array.from(value);
  return {user, items: answer.items, milliseconds: answer.milliseconds};
}"""


def baskets_of(model: ServingModel) -> list[tuple[list[str], str | None]]:
    """Real baskets: the first purchases of real customers, of several sizes, at each storefront
    (with its private item offsets) and at none."""
    stores = list(model.storefronts.values())
    out = []
    for number, size in enumerate((1, 3, 8, 20, 5, 2)):
        store = stores[number % len(stores)]
        rows = [r for r in range(len(store.customer_ids)) if len(store.history(r)) >= size]
        history = store.history(rows[number % len(rows)])[:size]
        ids = [str(model.catalogue.item_ids[i]) for i in history]
        out.append((ids, None if number in (1, 5) else store.name))
    return out


def fold_in_float64(spec, shared, basket, offsets, settings: FoldInSettings) -> dict:
    """`fedshop.models.fold_in.fold_in` in float64: the same objective differentiated by autograd
    (so it checks the page's hand-written gradient, not a copy of it)."""
    return fold_in(spec, shared, basket, offsets, settings, dtype=torch.float64)


def gap(js_user: dict, user: dict) -> float:
    """Largest difference between two user vectors, relative to the vector's size (at least 1)."""
    scale = max(1.0, max(float(v.abs().max()) for v in user.values()))
    return (
        max(
            float(np.abs(np.array(js_user[name]) - value.double().numpy().ravel()).max())
            for name, value in user.items()
        )
        / scale
    )


def ranking(model: ServingModel, shared: dict, user: dict, offsets, basket: np.ndarray):
    user = {name: value.float() for name, value in user.items()}
    scores = catalogue_scores(model.spec, shared, Query(user, offsets))
    return scores.numpy().astype(np.float64), top_k_excluding(scores, K, basket)


# Tolerances (relative to the vector's or the scores' size, at least 1). The page computes in
# float64 on the float16 tables it received; the tests run Python on the very same tables.
# - EXACT, against fold_in's maths in float64: only the order of float64 sums differs (about 1e-16
#   per operation, measured 1e-15 after 30 steps); 1e-9 leaves room and nothing else.
# - TOLERANCE, against fedshop.models.fold_in.fold_in itself (float32): float32 rounds each score to
#   about 6e-8 relative; for MF and GMF the objective is convex and gradient descent damps such
#   errors (measured about 2e-7 after 30 steps). 1e-5 is 50x that, and far below what a bug does (a
#   wrong sign, a missing offset or ReLU mask moves u by order 1). NeuMF's objective is not convex,
#   which is why it folds in at a smaller step (`settings_for`): at lr 1 its descent bounced and
#   float32 and float64 runs of fold_in itself parted ways by up to 0.3; the early-steps comparison
#   (EARLY_STEPS) keeps checking the first steps alone.
EXACT = 1e-9
TOLERANCE = 1e-5
EARLY_STEPS = 5


@pytest.mark.parametrize("model_name", ["mf-bpr", "gmf", "neumf"])
def test_browser_fold_in_matches_python(servers, page, model_name):
    url, model = servers[model_name]
    open_page(page, url)
    tables = decode_bundle(bundle_of(model))
    shared, spec = tables["shared"], model.spec
    settings = settings_for(spec)
    vectors = interaction_vectors(spec, shared)
    worst = {"float64": 0.0, "float32": 0.0, "float32 early": 0.0, "scores": 0.0}
    overlaps, float32_overlaps, milliseconds = [], [], []
    for ids, silo in baskets_of(model):
        offsets = tables["offsets"][silo] if silo else None
        basket = np.array(list(dict.fromkeys(model.catalogue.lookup(i) for i in ids)))
        index = torch.as_tensor(basket)
        js = page.evaluate(JS_RECOMMEND, [ids, silo, K, settings.steps])
        early = page.evaluate(JS_RECOMMEND, [ids, silo, K, EARLY_STEPS])
        milliseconds.append(js["milliseconds"])

        exact = fold_in_float64(spec, shared, index, offsets, settings)
        worst["float64"] = max(worst["float64"], gap(js["user"], exact))
        assert gap(js["user"], exact) <= EXACT, f"{model_name}, basket {ids} at {silo}"
        python = fold_in(spec, shared, index, item_offsets=offsets)
        worst["float32"] = max(worst["float32"], gap(js["user"], python))
        assert gap(js["user"], python) <= TOLERANCE, f"{model_name}, basket {ids} at {silo}"
        python_early = fold_in(
            spec, shared, index, offsets, FoldInSettings(EARLY_STEPS, settings.lr, settings.l2)
        )
        worst["float32 early"] = max(worst["float32 early"], gap(early["user"], python_early))
        assert gap(early["user"], python_early) <= TOLERANCE, f"{model_name}, basket {ids}"

        # The top 10: the server's ranking of the same vector. Equal, but for near-ties.
        scores, ranked = ranking(model, shared, python, offsets, basket)
        scale = max(1.0, float(np.abs(scores).max()))
        js_ids = [item["item_id"] for item in js["items"]]
        py_ids = [str(model.catalogue.item_ids[i]) for i in ranked.items]
        for item in js["items"]:
            difference = abs(item["score"] - scores[model.catalogue.lookup(item["item_id"])])
            worst["scores"] = max(worst["scores"], difference / scale)
            assert difference <= TOLERANCE * scale, f"{model_name}: score of {item['item_id']}"
        if js_ids != py_ids:
            for item_id in js_ids:  # a swap only within tolerance of the tenth place
                assert scores[model.catalogue.lookup(item_id)] >= ranked.scores[-1] - 1e-5 * scale
        else:
            assert [[b["item_id"] for b in item["because"]] for item in js["items"]] == [
                [str(model.catalogue.item_ids[j]) for j, _ in because(vectors, basket, int(i))]
                for i in ranked.items
            ]
        _, ranked32 = ranking(model, shared, python, offsets, basket)
        float32_overlaps.append(len(set(js_ids) & set(model.catalogue.item_ids[ranked32.items])))
        # Against the server at full precision (float32 tables): what float16 costs the shopper.
        served = model.recommend_basket(ids, K, silo)
        overlaps.append(len(set(js_ids) & {item["item_id"] for item in served["items"]}))
    print(
        f"\n{model_name}, {len(overlaps)} baskets: page vs fold_in on the same float16 tables, "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
        + f"; top-10 overlap with float32 fold_in: min {min(float32_overlaps)}, mean "
        f"{np.mean(float32_overlaps):.1f}; with the full-precision server: min {min(overlaps)}, "
        f"mean {np.mean(overlaps):.1f} of {K}; fold-in and ranking in the page: median "
        f"{np.median(milliseconds):.0f} ms"
    )
    assert min(float32_overlaps) >= K - 1
    assert min(overlaps) >= K // 2


# ---- the shopper view -----------------------------------------------------------------------------------


def record_requests(page) -> list[dict[str, str]]:
    requests: list[dict[str, str]] = []
    page.on(
        "request",
        lambda r: requests.append({"url": r.url, "method": r.method, "body": r.post_data or ""}),
    )
    return requests


def recommendations(page) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        "#recommendations li",
        """items => items.map(li => ({
            id: li.dataset.itemId,
            name: li.querySelector('.name').textContent,
            price: li.querySelector('.price').textContent,
            because: li.querySelector('.because') ? li.querySelector('.because').textContent : '',
        }))""",
    )


def add_first_result(page, words: str) -> str:
    """Search the catalogue for `words` and add the first hit not yet in the basket; its id."""
    page.fill("#search", words)
    page.wait_for_selector(f"#search-results[data-query='{words}'] li[data-item-id]")
    basket = set(page.evaluate("window.FedShopPage.basket"))
    for row in page.query_selector_all("#search-results li[data-item-id]"):
        item_id = row.get_attribute("data-item-id")
        if item_id not in basket:
            row.query_selector("button.add").click()
            return item_id
    raise AssertionError(f"no new item found for '{words}'")


def test_shopper_view_known_customer_and_private_basket(servers, page, artifacts):
    url, model = servers["mf-bpr"]
    requests = record_requests(page)
    load_ms = open_page(page, url)
    print(f"\n/api/model downloaded and decoded in the browser in {load_ms:.0f} ms")

    # A storefront, then one of its customers: the server's recommendations, rendered.
    store = list(model.storefronts)[1]
    page.select_option("#storefront", store)
    page.wait_for_function(
        "document.querySelectorAll('#customer option').length > 1"
        f" && document.getElementById('storefront').value === {json.dumps(store)}"
    )
    customer = page.eval_on_selector("#customer", "s => s.options[1].value")
    page.select_option("#customer", customer)
    page.wait_for_selector("#recommendations[data-source='customer'] li")
    shown = recommendations(page)
    _, _, body = get(f"{url}/recommend?customer={customer}&k={K}")
    expected = json.loads(body)
    assert expected["silo"] == store
    assert [r["id"] for r in shown] == [item["item_id"] for item in expected["items"]]
    assert [r["name"] for r in shown] == [item["name"] for item in expected["items"]]
    assert all(re.fullmatch(r"\d+\.\d\d", r["price"]) for r in shown), shown  # Online Retail prices
    assert any(r["because"].startswith("because you bought ") for r in shown)
    page.screenshot(path=str(artifacts / "shopper-customer.png"), full_page=True)

    # An anonymous basket, built by searching: recommendations computed in the page, updating.
    first = add_first_result(page, "heart")
    page.wait_for_selector("#recommendations[data-source='browser'][data-basket='1'] li")
    one = recommendations(page)
    assert len(one) == K and first not in [r["id"] for r in one]
    second = add_first_result(page, "lantern")
    page.wait_for_selector("#recommendations[data-basket='2'] li")
    two = recommendations(page)
    assert [r["id"] for r in two] != [r["id"] for r in one]
    assert all(r["because"].startswith("because you bought ") for r in two[:3])
    third = add_first_result(page, "mug")
    page.wait_for_selector("#recommendations[data-basket='3'] li")
    basket = page.evaluate("window.FedShopPage.basket")
    assert basket == [first, second, third]
    # What the page shows is the fold-in of that basket (the full-precision server as a check on
    # the wiring; the maths is compared to tolerance in test_browser_fold_in_matches_python).
    served = model.recommend_basket(basket, K, store)
    overlap = {r["id"] for r in recommendations(page)} & {i["item_id"] for i in served["items"]}
    assert len(overlap) >= K // 2
    page.screenshot(path=str(artifacts / "shopper-basket.png"), full_page=True)
    page.click(f"#basket li[data-item-id='{second}'] button.remove")
    page.wait_for_selector("#recommendations[data-basket='2'] li")

    # Nothing the page sent carries a basket item: not in a URL, not in a body; no POST at all.
    tokens = set()
    for request in requests:
        tokens |= set(re.split(r"[^0-9A-Za-z]+", request["url"] + " " + request["body"]))
    leaked = {first, second, third} & tokens
    assert not leaked, f"basket items sent: {leaked}"
    assert all(r["method"] == "GET" for r in requests), [
        r for r in requests if r["method"] != "GET"
    ]
    paths = [r["url"].removeprefix(url).split("?")[0] for r in requests]
    assert paths.count("/recommend") == 1  # the known customer's, before the basket
    assert paths.count("/api/model") == 1 and paths.count("/api/model.bin") == 1
    print(f"{len(requests)} requests, none with the basket; screenshots in {artifacts}")


# ---- the operator view ----------------------------------------------------------------------------------


def test_operator_view(servers, page, artifacts, runs_root):
    url, _ = servers["mf-bpr"]
    open_page(page, url + "/#operator")
    page.wait_for_selector("#runs tbody tr")
    listed = page.eval_on_selector_all("#runs tbody tr", "rows => rows.map(r => r.dataset.run)")
    assert sorted(listed) == sorted(RUNS)
    page.click("#runs tr[data-run='mf-dp']")

    # The curve: federated per round against the centralized curve and the popularity level.
    page.wait_for_selector("#section-curve svg polyline[data-series='federated']")
    federated = page.get_attribute("polyline[data-series='federated']", "points").split()
    assert len(federated) == RUNS["mf-dp"]["federated.rounds"]
    assert page.query_selector("#section-curve polyline[data-series='centralized']")
    assert page.query_selector("#section-curve line[data-series='popularity']")
    metrics = json.loads((runs_root / "mf-dp" / "metrics.json").read_text())
    legend = page.text_content("#section-curve .legend")
    assert f"federated {metrics['federated']['hr@10']:.3f}" in legend

    # Per storefront: every silo, the HR@10 of each method as metrics.json has it.
    rows = page.eval_on_selector_all(
        "#per-silo-table tbody tr",
        "rows => rows.map(r => [r.dataset.silo, ...[...r.cells].slice(1).map(c => c.textContent)])",
    )
    assert [r[0] for r in rows] == list(metrics["per_silo"])
    for silo, users, *hr in rows:
        per_method = metrics["per_silo"][silo]
        assert int(users.replace(",", "")) == per_method["federated"]["users"]
        assert hr == [
            f"{per_method[m]['hr@10']:.3f}" for m in ("federated", "centralized", "popularity")
        ]

    # Privacy: the run's ε and, from the ledger, what each storefront has spent of its budget.
    summary = page.text_content("#privacy-summary")
    assert f"ε = {metrics['privacy']['epsilon']:.2f}" in summary
    ledger = page.eval_on_selector_all(
        "#ledger-table tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert [r[0] for r in ledger] == list(metrics["per_silo"])
    for _, spent, budget, *_ in ledger:
        assert spent == f"{metrics['privacy']['epsilon']:.2f}" and budget == "100.00"

    assert "online-retail" in page.text_content("#section-data-report")
    assert "Not computed for this run" in page.text_content("#section-cold-start")
    assert "fedshop insight" in page.text_content("#section-insight")
    page.screenshot(path=str(artifacts / "operator.png"), full_page=True)

    # A run without DP: the privacy block says so.
    page.click("#runs tr[data-run='gmf']")
    page.wait_for_function(
        "document.querySelector('#run-detail h2') && "
        "document.querySelector('#run-detail h2').textContent === 'gmf'"
    )
    assert "No differential privacy" in page.text_content("#privacy-summary")
    print(f"\noperator view screenshot in {artifacts}")


# ---- the web API (no browser) ---------------------------------------------------------------------------


def test_model_download_is_cached(servers):
    url, model = servers["gmf"]
    status, headers, body = get(url + "/api/model")
    assert status == 200 and headers["cache-control"] == "no-cache"
    manifest = json.loads(body)
    assert manifest["model"] == "gmf" and manifest["n_items"] == len(model.catalogue)
    assert manifest["items"]["ids"][:3] == [str(i) for i in model.catalogue.item_ids[:3]]
    assert {t["dtype"] for t in manifest["tables"].values()} == {"float16"}
    assert set(manifest["dense"]) == {"output_weight"}
    status, _, _ = get(url + "/api/model", {"If-None-Match": headers["etag"]})
    assert status == 304
    status, data_headers, data = get(url + manifest["data"]["url"])
    assert status == 200 and len(data) == manifest["data"]["bytes"]
    assert "immutable" in data_headers["cache-control"]
    assert data_headers["content-type"] == "application/octet-stream"
    status, _, body = get(url + "/api/model.bin?v=0123456789abcdef0123")  # another model's URL
    assert status == 404 and "read /api/model again" in json.loads(body)["error"]["message"]
    # Every served storefront's private offsets are there, as the server holds them (to float16).
    for silo in manifest["silos"]:
        offsets = model.storefronts[silo["name"]].item_offsets
        sent = decode_bundle(bundle_of(model))["offsets"][silo["name"]]
        assert torch.allclose(sent, offsets, atol=1e-3, rtol=1e-3)


def test_model_under_silo_carries_only_that_storefronts_offsets(runs_root):
    with serve_run(runs_root, "gmf", silo="Germany") as (url, _):
        manifest = json.loads(get(url + "/api/model")[2])
    assert [s["name"] for s in manifest["silos"]] == ["Germany"]
    assert manifest["silos"][0]["item_bias"] is not None


def raw_get(url: str, path: str) -> tuple[int, dict]:
    """GET `path` exactly as written (urllib and browsers would resolve `..` first)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, json.loads(body) if body else {}


def test_runs_endpoints_stay_inside_the_runs_folder(servers, runs_root, tmp_path):
    url, _ = servers["mf-bpr"]
    runs = json.loads(get(url + "/api/runs")[2])
    assert {r["name"] for r in runs["runs"]} == set(RUNS)
    served = [r for r in runs["runs"] if r["served"]]
    assert [r["name"] for r in served] == ["mf-dp"] and served[0]["epsilon"] > 0
    status, detail = raw_get(url, "/api/runs/mf-dp")
    assert status == 200 and detail["ledger"]["available"]

    # Outside the runs folder: a run folder next to it, reached through a symlink inside it.
    outside = tmp_path / "elsewhere"
    shutil.copytree(runs_root / "gmf", outside / "stolen")
    link = runs_root / "link-out"
    link.symlink_to(outside / "stolen", target_is_directory=True)
    try:
        for path in (
            "/api/runs/..",
            "/api/runs/%2E%2E",
            "/api/runs/..%2F..%2Fetc",
            "/api/runs/%2Fetc",
            "/api/runs/mf-dp%2F..%2F..",
            "/api/runs/.",
            "/api/runs/link-out",
            "/api/runs/missing",
            "/api/runs/mf-dp%00",
        ):
            status, body = raw_get(url, path)
            assert status == 404, (path, status, body)
            assert body["error"]["status"] == 404, path
        assert "link-out" not in {r["name"] for r in json.loads(get(url + "/api/runs")[2])["runs"]}

        # A folder whose metrics.json does not parse is listed as such, not a 500.
        (runs_root / "broken").mkdir()
        (runs_root / "broken" / "metrics.json").write_text("{", encoding="utf-8")
        listed = {r["name"]: r for r in json.loads(get(url + "/api/runs")[2])["runs"]}
        assert "cannot read metrics.json" in listed["broken"]["error"]
        assert raw_get(url, "/api/runs/broken")[0] == 404
    finally:
        link.unlink()
        shutil.rmtree(runs_root / "broken", ignore_errors=True)


def test_insight_missing_says_how_to_compute_it(servers):
    url, _ = servers["mf-bpr"]
    status, _, body = get(url + "/api/insight")
    assert status == 404
    assert "not computed for this run: run `fedshop insight" in json.loads(body)["error"]["message"]

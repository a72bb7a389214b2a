"""`fedshop serve` of a fit run (`train --task fit`): GET /fit through real uvicorn on 127.0.0.1.

One small real fit run is trained once for the module. Expected answers are computed here from the
training data set and the shop's own private file with the model code (`probabilities`), not
through the server's lookups, so a mistake in serving shows up as a mismatch.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedshop.data.fit_feedback import size_feature
from fedshop.errors import FedShopError
from fedshop.experiment import slug
from fedshop.models.fit import Batch, get_fit_model, probabilities
from fedshop.serve.fit import FitServingModel, create_fit_app
from fedshop.serve.model import ServingModel
from serving_runs import LiveServer

LABELS = ("small", "fit", "large")


@pytest.fixture(scope="module")
def fit_run(data_dir, tmp_path_factory):
    """A small real fit run (3,000 shoppers, 2 federated rounds) and the data set it trained on."""
    from fedshop.config import load_config
    from fedshop.data.fit_feedback import load_fit_dataset
    from fedshop.fit_experiment import run_fit_experiment
    from fedshop.report.fit_run import write_fit_run

    config = load_config(
        overrides={
            "task": "fit",
            "data.dataset": "renttherunway",
            "fit.max_shoppers": 3000,
            "federated.rounds": 2,
            "fit.methods": ["federated"],
            "data.data_dir": str(data_dir),
        }
    )
    dataset = load_fit_dataset(config.data, config.fit, config.seed)
    result = run_fit_experiment(config, dataset)
    folder = tmp_path_factory.mktemp("fit-run")
    write_fit_run(folder, result)
    return folder, dataset


@pytest.fixture(scope="module")
def model(fit_run):
    return FitServingModel.load(fit_run[0])


@pytest.fixture(scope="module")
def api(model):
    server = LiveServer(create_fit_app(model))
    yield server.client
    server.close()


def shops_of(dataset) -> dict[str, list[str]]:
    """Each shopper's shops (in the run's order), from the training data set."""
    out: dict[str, list[str]] = {}
    for silo in dataset.silos:
        for user in dataset.user_ids[silo.users]:
            out.setdefault(str(user), []).append(silo.name)
    return out


def expected(folder: Path, dataset, shop: str | None, customer: str | None, item: str):
    """(sizes, P) computed from the data set's products and the shop's own private file."""
    serving = json.loads((folder / "serving.json").read_text())
    fit_model = get_fit_model(serving["model"])
    shared = load_file(folder / "models" / "federated" / "shared.safetensors")
    index = int(np.flatnonzero(dataset.item_ids.astype(str) == item)[0])
    products = dataset.products_of(index)
    width = shared["product_size"].shape[1]
    private = {"user_size": torch.zeros(1, width), "user_bias": torch.zeros(1, 1)}
    if shop is not None and customer is not None:
        stem = folder / "models" / "federated" / f"silo-{slug(shop)}"
        tables = load_file(stem.with_name(stem.name + ".safetensors"))
        with np.load(stem.with_name(stem.name + ".customers.npz")) as archive:
            ids = list(archive["customer_ids"].astype(str))
        if customer in ids:
            row = ids.index(customer)
            private = {n: tables[n][row : row + 1].float() for n in ("user_size", "user_bias")}
    n = len(products)
    batch = Batch(
        torch.zeros(n, dtype=torch.int64),
        torch.as_tensor(products, dtype=torch.int64),
        torch.full((n,), index, dtype=torch.int64),
        torch.zeros(n, dtype=torch.int64),
        torch.from_numpy(size_feature(dataset.product_size[products])),
    )
    probs = probabilities(fit_model, shared, private, None, batch).numpy()
    return dataset.product_size[products], probs


def an_item(dataset, least_sizes: int = 3) -> str:
    """An item with several sizes."""
    counts = np.bincount(dataset.product_item)
    return str(dataset.item_ids[int(np.flatnonzero(counts >= least_sizes)[0])])


def check_answer(answer: dict) -> None:
    sizes = [row["size"] for row in answer["sizes"]]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for row in answer["sizes"]:
        assert sum(row[label] for label in LABELS) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= row[label] <= 1.0 for label in LABELS)
    fits = [row["fit"] for row in answer["sizes"]]
    if answer["known_customer"]:
        assert answer["suggested_size"] == answer["sizes"][int(np.argmax(fits))]["size"]
    else:  # no size known for her: no advice
        assert answer["suggested_size"] is None


# ---- answers -----------------------------------------------------------------------------------------


def test_health_names_the_fit_run(api, fit_run):
    health = api.get("/health").json()
    assert health["status"] == "ok" and health["task"] == "fit"
    assert health["model"] == "k-lf-ml"
    assert health["silos"] == [s.name for s in fit_run[1].silos]
    assert health["products"] == fit_run[1].n_products
    assert health["items"] == len(fit_run[1].item_ids)


def test_item_index_is_the_one_training_used(model, fit_run):
    dataset = fit_run[1]
    assert model.products.item_ids == [str(i) for i in dataset.item_ids]
    for index in range(0, len(dataset.item_ids), 97):
        assert list(model.products.of_item[index]) == list(dataset.products_of(index))


def test_a_known_customer_is_scored_with_her_shop_s_own_row(api, fit_run):
    folder, dataset = fit_run
    item = an_item(dataset)
    customer = next(c for c, shops in shops_of(dataset).items() if len(shops) == 1)
    shop = shops_of(dataset)[customer][0]
    response = api.get("/fit", params={"customer": customer, "item": item})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["customer"] == customer and answer["item"] == item
    assert answer["shop"] == shop and answer["known_customer"] is True
    check_answer(answer)
    sizes, probs = expected(folder, dataset, shop, customer, item)
    assert [row["size"] for row in answer["sizes"]] == pytest.approx(list(sizes))
    served = np.array([[row[label] for label in LABELS] for row in answer["sizes"]])
    np.testing.assert_allclose(served, probs, rtol=1e-5, atol=1e-6)
    # Her answer is her own: not the new shopper's.
    _, anonymous = expected(folder, dataset, None, None, item)
    assert not np.allclose(probs, anonymous)


def test_a_requested_size_is_answered_on_its_own(api, fit_run):
    dataset = fit_run[1]
    item = an_item(dataset)
    customer = next(iter(shops_of(dataset)))
    shops = shops_of(dataset)[customer]
    whole = api.get("/fit", params={"customer": customer, "item": item, "shop": shops[0]}).json()
    second = whole["sizes"][1]
    answer = api.get(
        "/fit",
        params={"customer": customer, "item": item, "shop": shops[0], "size": second["size"]},
    ).json()
    assert answer["requested"] == second
    assert answer["sizes"] == whole["sizes"]


def test_a_customer_of_several_shops_must_name_one(api, fit_run):
    folder, dataset = fit_run
    item = an_item(dataset)
    customer, shops = next((c, s) for c, s in shops_of(dataset).items() if len(s) > 1)
    response = api.get("/fit", params={"customer": customer, "item": item})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert all(shop in message for shop in shops)
    # Named (by slug), each shop answers with its own copy of her size.
    for shop in shops[:2]:
        answer = api.get(
            "/fit", params={"customer": customer, "item": item, "shop": slug(shop)}
        ).json()
        assert answer["shop"] == shop and answer["known_customer"] is True
        _, probs = expected(folder, dataset, shop, customer, item)
        served = np.array([[row[label] for label in LABELS] for row in answer["sizes"]])
        np.testing.assert_allclose(served, probs, rtol=1e-5, atol=1e-6)


def test_a_new_shopper_is_scored_with_a_zero_size(api, fit_run):
    folder, dataset = fit_run
    item = an_item(dataset)
    answer = api.get("/fit", params={"customer": "nobody-here", "item": item}).json()
    assert answer["known_customer"] is False and answer["shop"] is None
    check_answer(answer)
    _, probs = expected(folder, dataset, None, None, item)
    served = np.array([[row[label] for label in LABELS] for row in answer["sizes"]])
    np.testing.assert_allclose(served, probs, rtol=1e-5, atol=1e-6)
    # Known elsewhere but not at the named shop: a new shopper there.
    customer, shops = next((c, s) for c, s in shops_of(dataset).items() if len(s) == 1)
    other = next(s.name for s in dataset.silos if s.name not in shops)
    there = api.get("/fit", params={"customer": customer, "item": item, "shop": other}).json()
    assert there["known_customer"] is False and there["shop"] == other
    assert there["sizes"] == answer["sizes"]


@pytest.mark.parametrize(
    ("params", "status", "fragments"),
    [
        ({"customer": "1", "item": "no-such-item"}, 404, ["no-such-item"]),
        ({"customer": "1", "item": "ITEM", "size": "999"}, 404, ["999", "its sizes"]),
        ({"customer": "1", "item": "ITEM", "size": "large"}, 422, ["size"]),
        ({"customer": "1", "item": "ITEM", "shop": "Atlantis"}, 404, ["Atlantis", "wedding"]),
        ({"item": "ITEM"}, 422, ["customer"]),
        ({"customer": " ", "item": "ITEM"}, 422, ["customer"]),
        ({"customer": "1"}, 422, ["item"]),
        ({"customer": "1", "item": "ITEM", "shop": ""}, 422, ["shop"]),
    ],
)
def test_bad_requests_are_clear_json_errors(api, fit_run, params, status, fragments):
    item = an_item(fit_run[1])
    params = {k: item if v == "ITEM" else v for k, v in params.items()}
    response = api.get("/fit", params=params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status
    assert all(fragment in error["message"] for fragment in fragments), error["message"]
    if "size" in params and status == 404:
        whole = api.get("/fit", params={k: v for k, v in params.items() if k != "size"}).json()
        sizes = [row["size"] for row in whole["sizes"]]
        assert all(str(s) in error["message"] for s in sizes)


# ---- one shop, and what is refused -----------------------------------------------------------------------


def test_one_shop_reads_only_its_own_files(fit_run, tmp_path):
    folder, dataset = fit_run
    copy = shutil.copytree(folder, tmp_path / "run")
    shop = dataset.silos[1]
    for path in (copy / "models" / "federated").glob("silo-*"):
        if not path.name.startswith(f"silo-{slug(shop.name)}."):
            path.unlink()
    model = FitServingModel.load(copy, silo=slug(shop.name))
    assert model.served == [shop.name]
    server = LiveServer(create_fit_app(model))
    try:
        item = an_item(dataset)
        mine = str(dataset.user_ids[shop.users[0]])
        answer = server.client.get("/fit", params={"customer": mine, "item": item}).json()
        assert answer["shop"] == shop.name and answer["known_customer"] is True
        other = dataset.silos[0].name
        refused = server.client.get("/fit", params={"customer": mine, "item": item, "shop": other})
        assert refused.status_code == 403
    finally:
        server.close()


def test_runs_that_cannot_be_served_say_why(fit_run, tmp_path):
    folder = fit_run[0]
    with pytest.raises(FedShopError, match="fit run"):
        ServingModel.load(folder)
    copy = shutil.copytree(folder, tmp_path / "measure")
    serving = json.loads((copy / "serving.json").read_text())
    (copy / "serving.json").write_text(json.dumps({**serving, "model": "measure-ml"}))
    with pytest.raises(FedShopError, match="measurements"):
        FitServingModel.load(copy)
    with pytest.raises(FedShopError, match="Atlantis"):
        FitServingModel.load(folder, silo="Atlantis")


def test_fedshop_serve_dispatches_a_fit_run(fit_run):
    folder, dataset = fit_run
    process = subprocess.Popen(
        [sys.executable, "-m", "fedshop", "serve", str(folder), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in process.stdout:
            if line.startswith("Ask "):
                url = line.split()[1].split("fit?")[0]
                break
        assert url and url.startswith("http://127.0.0.1:"), url
        assert httpx.get(url + "health", timeout=30).json()["task"] == "fit"
        answer = httpx.get(
            url + "fit", params={"customer": "nobody", "item": an_item(dataset)}, timeout=30
        ).json()
        assert answer["known_customer"] is False
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr

"""`fedshop serve`: the API over real trained runs, through real uvicorn on 127.0.0.1 and httpx.

Expected answers are computed here from the run folder's files with the model code (score_all,
fold_in), never through the server's own ranking, so a mistake in serving shows up as a mismatch.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedshop.cli import _listen, exposure_warning
from fedshop.errors import FedShopError
from fedshop.experiment import slug
from fedshop.models.fold_in import fold_in
from fedshop.models.spec import get_model, score_all
from fedshop.serve.app import create_app
from fedshop.serve.model import ServingModel
from serving_runs import LiveServer, copy_run, trained_run

RETAIL = "retail-mf-cross-silo"
DEVICE = "retail-gmf-cross-device"
NEUMF = "ml100k-neumf-cross-device"


# ---- a real server in a thread ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def retail():
    return ServingModel.load(trained_run(RETAIL).folder)


@pytest.fixture(scope="module")
def api(retail):
    server = LiveServer(create_app(retail))
    yield server.client
    server.close()


@pytest.fixture(scope="module")
def germany_api():
    """The same run served as one storefront (`--silo germany`)."""
    server = LiveServer(create_app(ServingModel.load(trained_run(RETAIL).folder, silo="germany")))
    yield server.client
    server.close()


# ---- expected answers, from the files ---------------------------------------------------------------


class RunFiles:
    """A run folder read with plain file readers: the shared tables, and per silo its tables and
    customer map."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.serving = json.loads((folder / "serving.json").read_text())
        self.spec = get_model(self.serving["model"])
        self.shared = load_file(str(folder / "models" / "federated" / "shared.safetensors"))
        self.item_ids = [
            line.split(",")[1] for line in (folder / "catalogue.csv").read_text().splitlines()[1:]
        ]

    def silo(self, name: str) -> tuple[dict, dict]:
        stem = self.folder / "models" / "federated" / f"silo-{slug(name)}"
        tables = load_file(str(stem) + ".safetensors")
        with np.load(io.BytesIO(Path(str(stem) + ".customers.npz").read_bytes())) as archive:
            customers = {key: archive[key] for key in archive.files}
        return tables, customers

    def customer(self, name: str, row: int) -> tuple[str, dict, torch.Tensor | None, np.ndarray]:
        tables, customers = self.silo(name)
        user = {t: tables[t][row : row + 1] for t in self.spec.user_tables}
        offsets = tables.get("silo_item_bias")
        indptr = customers["history_indptr"]
        history = customers["history_items"][indptr[row] : indptr[row + 1]]
        return str(customers["customer_ids"][row]), user, offsets, history

    def top_k(self, user: dict, offsets, exclude: np.ndarray, k: int) -> tuple[list, np.ndarray]:
        private = dict(user)
        if offsets is not None:
            private["silo_item_bias"] = offsets.reshape(1, -1)
        scores = score_all(self.spec, self.shared, private, torch.tensor([0]))[0].double()
        scores[torch.as_tensor(exclude, dtype=torch.int64)] = -np.inf
        values, items = torch.topk(scores, k)
        return [self.item_ids[i] for i in items], values.numpy()


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == status
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    assert "Traceback" not in response.text


# ---- the endpoints ----------------------------------------------------------------------------------


def test_health_and_silos(api):
    run = trained_run(RETAIL)
    names = list(run.result.dataset.silo_names)
    health = api.get("/health").json()
    assert health == {
        "status": "ok",
        "run": run.folder.name,
        "model": "mf-bpr",
        "mode": "cross-silo",
        "items": run.result.dataset.n_items,
        "silos": names,
    }
    assert api.get("/silos").json() == {"silos": [{"name": n, "slug": slug(n)} for n in names]}


@pytest.mark.parametrize("silo", ["Germany", "United Kingdom", "France"])
def test_a_customer_gets_their_own_silos_ranking_of_items_they_did_not_buy(api, silo):
    files = RunFiles(trained_run(RETAIL).folder)
    customer, user, offsets, history = files.customer(silo, row=3)
    assert offsets is not None and offsets.abs().sum() > 0  # the silo's private offsets count
    answer = api.get("/recommend", params={"customer": customer, "k": 10}).json()
    assert (answer["customer"], answer["silo"], answer["k"]) == (customer, silo, 10)
    items = answer["items"]
    expected_ids, expected_scores = files.top_k(user, offsets, history, 10)
    assert [i["item_id"] for i in items] == expected_ids
    assert np.allclose([i["score"] for i in items], expected_scores, atol=1e-5)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    bought = {files.item_ids[j] for j in history}
    assert not bought & {i["item_id"] for i in items}
    assert any(item["because"] for item in items)
    for item in items:
        assert set(item) == {"item_id", "name", "price", "score", "because"}
        assert isinstance(item["price"], float) and item["name"]
        reasons = item["because"]
        assert len(reasons) <= 3
        assert {r["item_id"] for r in reasons} <= bought
        weights = [r["weight"] for r in reasons]
        assert all(w > 0 for w in weights) and weights == sorted(weights, reverse=True)


def test_the_explanation_is_the_past_items_that_contribute_most(api, retail):
    files = RunFiles(trained_run(RETAIL).folder)
    customer, _, _, history = files.customer("Germany", row=0)
    top = api.get("/recommend", params={"customer": customer, "k": 1}).json()["items"][0]
    vectors = files.shared["item_embedding"]  # MF: the item embeddings themselves
    target = files.item_ids.index(top["item_id"])
    weights = (vectors[history] @ vectors[target]).numpy()
    order = np.argsort(-weights)[:3]
    expected = [(files.item_ids[history[j]], weights[j]) for j in order if weights[j] > 0]
    got = [(r["item_id"], r["weight"]) for r in top["because"]]
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert np.allclose([w for _, w in got], [w for _, w in expected], atol=1e-5)


@pytest.mark.parametrize("silo", [None, "Germany"])
def test_a_basket_is_folded_in_and_ranked_as_fold_in_says(api, silo):
    files = RunFiles(trained_run(RETAIL).folder)
    basket_ids = ["85123A", "22423", "47566"]
    body = {"basket": basket_ids, "k": 8, **({"silo": silo} if silo else {})}
    answer = api.post("/recommend", json=body).json()
    basket = np.array([files.item_ids.index(i) for i in basket_ids])
    offsets = files.silo(silo)[0]["silo_item_bias"] if silo else None
    user = fold_in(files.spec, files.shared, torch.as_tensor(basket), item_offsets=offsets)
    expected_ids, expected_scores = files.top_k(user, offsets, basket, 8)
    assert answer["silo"] == silo and answer["k"] == 8
    assert [i["item_id"] for i in answer["basket"]] == basket_ids
    assert [i["item_id"] for i in answer["items"]] == expected_ids
    assert np.allclose([i["score"] for i in answer["items"]], expected_scores, atol=1e-4)
    assert not set(basket_ids) & {i["item_id"] for i in answer["items"]}
    for item in answer["items"]:
        assert {r["item_id"] for r in item["because"]} <= set(basket_ids)


def test_the_storefront_changes_a_basket_ranking(api):
    basket = {"basket": ["85123A", "22423"], "k": 20}
    plain = api.post("/recommend", json=basket).json()["items"]
    german = api.post("/recommend", json={**basket, "silo": "germany"}).json()["items"]
    assert [i["score"] for i in plain] != [i["score"] for i in german]


def test_similar_items_by_cosine(api):
    files = RunFiles(trained_run(RETAIL).folder)
    answer = api.get("/similar", params={"item": "85123A", "k": 5}).json()
    assert answer["item"]["item_id"] == "85123A"
    assert answer["item"]["name"] == "WHITE HANGING HEART T-LIGHT HOLDER"
    vectors = torch.nn.functional.normalize(files.shared["item_embedding"].double(), dim=1)
    index = files.item_ids.index("85123A")
    cosines = vectors @ vectors[index]
    cosines[index] = -np.inf
    values, items = torch.topk(cosines, 5)
    assert [i["item_id"] for i in answer["items"]] == [files.item_ids[i] for i in items]
    assert np.allclose([i["score"] for i in answer["items"]], values.numpy(), atol=1e-5)


def test_items_search_by_name_or_id(api):
    hearts = api.get("/items", params={"q": "HeArT", "limit": 15}).json()["items"]
    assert len(hearts) == 15 and all("heart" in i["name"].lower() for i in hearts)
    assert set(hearts[0]) == {"item_id", "name", "price"}
    by_id = api.get("/items", params={"q": "85123"}).json()["items"]
    assert "85123A" in [i["item_id"] for i in by_id]
    assert api.get("/items", params={"q": "no such thing at all"}).json() == {"items": []}
    assert len(api.get("/items").json()["items"]) == 20  # empty query: the most bought


def test_customers_of_a_silo(api):
    files = RunFiles(trained_run(RETAIL).folder)
    answer = api.get("/customers", params={"silo": "norway", "limit": 7}).json()
    assert answer["silo"] == "Norway" and len(answer["customers"]) == 7
    assert set(answer["customers"]) <= set(files.silo("Norway")[1]["customer_ids"])


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "fragments"),
    [
        ("get", "/recommend?customer=99999999", None, 404, ["'99999999'"]),
        ("get", "/recommend", None, 422, ["customer", "required"]),
        ("get", "/recommend?customer=12426&k=0", None, 422, ["k must be between 1 and 100"]),
        ("get", "/recommend?customer=12426&k=101", None, 422, ["got 101"]),
        ("get", "/recommend?customer=12426&k=ten", None, 422, ["k:", "integer"]),
        ("get", "/similar?item=NOPE", None, 404, ["'NOPE'"]),
        ("get", "/similar?item=85123A&k=1000", None, 422, ["k must be"]),
        ("get", "/items?limit=0", None, 422, ["limit must be"]),
        ("get", "/customers?silo=Atlantis", None, 404, ["'Atlantis'", "Germany"]),
        ("post", "/recommend", {"basket": ["85123A", "NOPE"]}, 404, ["'NOPE'"]),
        ("post", "/recommend", {"basket": []}, 422, ["basket"]),
        ("post", "/recommend", {"basket": ["85123A"], "k": 0}, 422, ["k must be"]),
        ("post", "/recommend", {"basket": ["85123A"], "silo": "Mars"}, 404, ["'Mars'"]),
        ("post", "/recommend", {"basket": ["85123A"], "kk": 3}, 422, ["kk"]),
        ("post", "/recommend", {"basket": "85123A"}, 422, ["basket"]),
        ("post", "/recommend", [1, 2], 422, ["JSON object"]),
        ("post", "/recommend", b'{"basket": ["85123A"', 422, ["malformed JSON"]),
        ("get", "/nowhere", None, 404, ["/nowhere"]),
        ("delete", "/health", None, 405, ["DELETE"]),
    ],
)
def test_bad_requests_get_a_status_and_a_message(api, method, path, payload, status, fragments):
    if isinstance(payload, bytes):
        response = api.request(
            method, path, content=payload, headers={"content-type": "application/json"}
        )
    elif payload is not None:
        response = api.request(method, path, json=payload)
    else:
        response = api.request(method, path)
    assert_error(response, status, *fragments)


def test_an_internal_error_is_a_500_without_a_traceback(retail, caplog):
    app = create_app(retail)

    def broken():
        raise RuntimeError("a secret detail")

    app.add_api_route("/broken", broken)
    server = LiveServer(app)
    try:
        with caplog.at_level("ERROR", logger="fedshop.serve"):
            response = server.client.get("/broken")
    finally:
        server.close()
    assert_error(response, 500, "internal error")
    assert "secret" not in response.text
    assert "a secret detail" in caplog.text  # the server's log has it


# ---- one storefront only (--silo) --------------------------------------------------------------------


def test_one_storefront_opens_only_its_own_private_files():
    """An audit hook sees every file the process opens while the model loads for one silo."""
    folder = trained_run(RETAIL).folder.resolve()
    opened: list[str] = []
    recording = threading.Event()

    def hook(event, args):
        if recording.is_set() and event == "open" and isinstance(args[0], str | bytes | Path):
            opened.append(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(hook)  # cannot be removed: it records only while the event is set
    recording.set()
    try:
        model = ServingModel.load(folder, silo="Germany")
    finally:
        recording.clear()
    models = str(folder / "models")
    assert sorted(Path(p).name for p in opened if p.startswith(models)) == [
        "shared.safetensors",
        "silo-germany.customers.npz",
        "silo-germany.safetensors",
    ]
    assert model.served == ["Germany"]


def test_one_storefront_serves_with_every_other_silos_files_gone(tmp_path):
    folder = copy_run(RETAIL, tmp_path / "run")
    for path in (folder / "models" / "federated").glob("silo-*"):
        if not path.name.startswith("silo-germany."):
            path.unlink()
    alone = ServingModel.load(folder, silo="GERMANY")
    full = ServingModel.load(trained_run(RETAIL).folder, silo="germany")
    customer = str(alone.storefronts["Germany"].customer_ids[5])
    assert alone.recommend(customer, 10) == full.recommend(customer, 10)
    with pytest.raises(FedShopError, match=r"silo-united-kingdom\.safetensors is missing"):
        ServingModel.load(folder)  # all silos: their files are gone


def test_one_storefront_refuses_other_customers_and_storefronts(germany_api):
    files = RunFiles(trained_run(RETAIL).folder)
    assert germany_api.get("/health").json()["silos"] == ["Germany"]
    assert germany_api.get("/silos").json() == {"silos": [{"name": "Germany", "slug": "germany"}]}
    german = str(files.silo("Germany")[1]["customer_ids"][0])
    french = str(files.silo("France")[1]["customer_ids"][0])
    assert germany_api.get("/recommend", params={"customer": german}).status_code == 200
    response = germany_api.get("/recommend", params={"customer": french})
    assert_error(response, 403, f"'{french}'", "not a customer of Germany")
    # Nobody's id gets the same answer: this server cannot tell, and does not say.
    assert_error(germany_api.get("/recommend?customer=99999999"), 403, "not a customer of Germany")
    assert_error(germany_api.get("/customers?silo=France"), 403, "only Germany")
    assert germany_api.get("/customers").json()["silo"] == "Germany"
    basket = {"basket": ["85123A"], "silo": "france"}
    assert_error(germany_api.post("/recommend", json=basket), 403, "only Germany")
    assert germany_api.post("/recommend", json={"basket": ["85123A"]}).status_code == 200


# ---- other modes and models -------------------------------------------------------------------------


def test_a_cross_device_gmf_run_is_served_per_storefront():
    files = RunFiles(trained_run(DEVICE).folder)
    model = ServingModel.load(files.folder)
    server = LiveServer(create_app(model))
    try:
        customer, user, offsets, history = files.customer("Spain", row=2)
        assert offsets is None
        answer = server.client.get("/recommend", params={"customer": customer, "k": 5}).json()
        assert answer["silo"] == "Spain"
        expected_ids, expected_scores = files.top_k(user, None, history, 5)
        assert [i["item_id"] for i in answer["items"]] == expected_ids
        assert np.allclose([i["score"] for i in answer["items"]], expected_scores, atol=1e-5)
        basket = server.client.post("/recommend", json={"basket": ["22423"], "k": 5}).json()
        assert len(basket["items"]) == 5
    finally:
        server.close()


def test_a_neumf_run_without_prices(data_dir):
    files = RunFiles(trained_run(NEUMF).folder)
    server = LiveServer(create_app(ServingModel.load(files.folder)))
    try:
        customer, user, _, history = files.customer(files.serving["silos"][0]["name"], row=0)
        answer = server.client.get("/recommend", params={"customer": customer, "k": 5}).json()
        expected_ids, expected_scores = files.top_k(user, None, history, 5)
        assert [i["item_id"] for i in answer["items"]] == expected_ids
        assert np.allclose([i["score"] for i in answer["items"]], expected_scores, atol=1e-5)
        assert all(i["price"] is None for i in answer["items"])
        # MovieLens ids are numbers: a basket may give them as JSON numbers.
        first, second = int(files.item_ids[0]), int(files.item_ids[1])
        basket = server.client.post("/recommend", json={"basket": [first, second], "k": 3})
        assert basket.status_code == 200, basket.text
        assert [i["item_id"] for i in basket.json()["basket"]] == [str(first), str(second)]
    finally:
        server.close()


# ---- start-up: the folder ---------------------------------------------------------------------------


def fedshop(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "fedshop", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def half_written(folder: Path) -> Path:
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    (folder / "INCOMPLETE").write_text(
        "This run stopped before it finished: interrupted (Ctrl-C)\n"
    )
    return folder


def from_an_older_fedshop(folder: Path) -> Path:
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"fedshop_version": "0.0.9"}))
    return folder


@pytest.mark.parametrize(
    ("make", "options", "fragments"),
    [
        (lambda p: p / "missing", [], ["does not exist"]),
        (half_written, [], ["half-written", "interrupted (Ctrl-C)"]),
        (from_an_older_fedshop, [], ["fedshop 0.0.9", "serving.json", "re-run training"]),
        (lambda p: trained_run(RETAIL).folder, ["--silo", "Atlantis"], ["Atlantis", "Germany"]),
    ],
)
def test_serve_refuses_a_folder_it_cannot_serve_in_one_line(tmp_path, make, options, fragments):
    result = fedshop("serve", make(tmp_path / "run"), *options)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: write_json(f / "serving.json", {"format": 2}), "serving format 2"),
        (lambda f: (f / "serving.json").write_text("{not json"), "cannot read"),
        (
            lambda f: write_json(
                f / "serving.json", {**json.loads((f / "serving.json").read_text()), "silos": []}
            ),
            "no federated model",
        ),
        (
            lambda f: (f / "models/federated/silo-germany.safetensors").write_bytes(b"\0" * 10),
            "cannot read",
        ),
        (
            lambda f: (f / "models/federated/silo-germany.customers.npz").write_bytes(b"PK junk"),
            "silo-germany.customers.npz",
        ),
        (lambda f: (f / "catalogue.csv").write_text("index,item_id\n0,x\n"), "no column"),
        (lambda f: (f / "metrics.json").unlink(), "not a run folder"),
    ],
)
def test_a_damaged_folder_is_one_clear_error(tmp_path, damage, fragment):
    folder = copy_run(RETAIL, tmp_path / "run")
    damage(folder)
    with pytest.raises(FedShopError) as caught:
        ServingModel.load(folder, silo="germany")
    message = str(caught.value)
    assert fragment in message and "\n" not in message


def test_serve_runs_the_api_until_interrupted(tmp_path):
    run = trained_run(RETAIL).folder
    process = subprocess.Popen(
        [sys.executable, "-m", "fedshop", "serve", str(run), "--silo", "germany", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in process.stdout:
            if line.startswith("Open "):
                url = line.split()[1]
                break
        assert url and url.startswith("http://127.0.0.1:"), url
        health = httpx.get(url + "health", timeout=30).json()
        assert health["silos"] == ["Germany"]
        assert httpx.get(url, timeout=30).status_code == 200  # the page
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "warning" not in stderr


def test_a_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FedShopError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)


def test_listening_beyond_loopback_says_who_can_reach_the_api():
    assert exposure_warning("127.0.0.1", "127.0.0.1", 8000) is None
    assert exposure_warning("localhost", "::1", 8000) is None
    warning = exposure_warning("0.0.0.0", "0.0.0.0", 8000)
    assert "anyone who can reach port 8000" in warning and "no login" in warning
    assert exposure_warning("192.168.1.5", "192.168.1.5", 80) is not None

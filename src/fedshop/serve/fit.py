"""Size and fit advice served from a fit run folder (`fedshop train --task fit`).

What is loaded (serving.json {"format": 1, "task": "fit", "model", "dim", "silos"}, see
`report/fit_run.py`):
- public: `serving.json`, `config.toml`, `products.csv` (product index → item id, size: the rows of
  the shared `product_size` table), the shared tensors `models/federated/shared.safetensors`;
- private, per shop (silo): its customers' sizes `silo-<slug>.safetensors` (`user_size`,
  `user_bias`) and its customer map `silo-<slug>.customers.npz` (row r is customer_ids[r]).

Shops are not linked: each keeps its own copy of a shopper's size. A customer known to one shop is
scored with that shop's row; one known to several must name the shop (`shop=`); one unknown to the
shop (or to every shop) is a new shopper, scored with a zero size vector and zero bias. With `--silo`
only that shop's private files are opened, and every answer is that shop's.

`measure-ml` runs are refused at start-up: that model predicts from body measurements, which the run
folder does not hold.

    GET /fit?customer=ID&item=CODE[&shop=NAME][&size=S]
    GET /health, GET /silos
"""

from __future__ import annotations

import io
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI

from fedshop.data.fit_feedback import size_feature
from fedshop.data.partition import slug
from fedshop.data.renttherunway import FIT_CLASSES
from fedshop.errors import FedShopError
from fedshop.models.fit import (
    CLASSES,
    FIT_MODELS,
    ITEM_TABLES,
    PRODUCT_TABLES,
    Batch,
    FitModel,
    Params,
    get_fit_model,
    probabilities,
)
from fedshop.report.fit_run import PRODUCTS
from fedshop.report.run_folder import SERVING
from fedshop.serve.model import (
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    RequestError,
    _names,
    _one_line,
    _read_npz,
    _read_tensors,
    read_serving_file,
)

LABELS = FIT_CLASSES  # the order of `probabilities`' columns
MAX_ID = 200  # the longest customer, item or shop text a request may carry


# ---- the run folder ---------------------------------------------------------------------------------


def serving_task(run_dir: Path) -> str | None:
    """The task of the run in `run_dir` ("fit"), or None when its serving.json is absent, does not
    parse or names no task (a recommendation run: `ServingModel.load` says what is wrong, if
    anything)."""
    try:
        value = json.loads((Path(run_dir).expanduser() / SERVING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    task = value.get("task") if isinstance(value, dict) else None
    return str(task) if task is not None else None


def read_fit_serving(run_dir: Path) -> dict[str, Any]:
    """A fit run's serving.json, after the checks that say why a folder cannot be served."""
    metrics, serving = read_serving_file(run_dir)
    if serving.get("task") != "fit":
        raise FedShopError(f"{run_dir / SERVING} is not a fit run's (task {serving.get('task')!r})")
    try:
        silos = [{"name": str(s["name"]), "slug": str(s["slug"])} for s in serving["silos"]]
        serving = {**serving, "model": str(serving["model"]), "dim": int(serving["dim"]),
                   "silos": silos}  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise FedShopError(f"cannot read {run_dir / SERVING}: bad or missing {exc}") from None
    if serving["model"] not in FIT_MODELS:
        raise FedShopError(
            f"{run_dir / SERVING}: fit model '{serving['model']}' is not one of "
            f"{', '.join(FIT_MODELS)}"
        )
    if not get_fit_model(serving["model"]).has_private:
        raise FedShopError(
            f"{run_dir} holds a {serving['model']} run: it predicts fit from each shopper's body "
            "measurements, which the run folder does not hold, so `fedshop serve` cannot answer "
            "for it; serve a run of a model with private sizes (k-lf-ml, k-lf-lr, k-lv-lr, 1-lv-lr)"
        )
    _check_config(run_dir, serving)
    shared = run_dir / "models" / "federated" / "shared.safetensors"
    if not silos or not shared.is_file():
        methods = [m for m in metrics if isinstance(metrics[m], dict) and "auc_macro" in metrics[m]]
        raise FedShopError(
            f"{run_dir} has no federated fit model to serve (its methods: "
            f"{', '.join(methods) or 'none'}); train with the federated method"
        )
    return serving


def _check_config(run_dir: Path, serving: dict[str, Any]) -> None:
    """config.toml's [fit] model and dim, when the folder has one, must be serving.json's."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return
    try:
        fit = tomllib.loads(path.read_text(encoding="utf-8")).get("fit") or {}
    except (OSError, ValueError) as exc:
        raise FedShopError(f"cannot read {path}: {_one_line(exc)}") from None
    for key in ("model", "dim"):
        if key in fit and fit[key] != serving[key]:
            raise FedShopError(
                f"{path} says [fit] {key} = {fit[key]!r}, {SERVING} says {serving[key]!r}"
            )


@dataclass(frozen=True)
class Products:
    """The products (item × size), in the order of the rows of `product_size`."""

    item_ids: list[str]  # the items, in the order of the rows of `item_bias`
    item_index: dict[str, int]
    sizes: np.ndarray  # float per product
    of_item: list[np.ndarray]  # per item index, its products, smallest size first

    @property
    def n_products(self) -> int:
        return len(self.sizes)


def _id_order(ids: np.ndarray) -> np.ndarray:
    """Sorted unique ids, in the order training's `pd.factorize(..., sort=True)` gave them: as
    numbers when every id is one (RentTheRunway's are), else as text."""
    unique = np.unique(ids.astype(str))
    try:
        numbers = np.array([int(i) for i in unique], dtype=np.int64)
    except ValueError:
        return unique
    return unique[np.argsort(numbers, kind="stable")]


def read_products(path: Path) -> Products:
    if not path.is_file():
        raise FedShopError(f"{path} is missing: it names the products (item × size) of the model")
    try:
        frame = pd.read_csv(
            io.BytesIO(path.read_bytes()), dtype={"product": "int64", "item_id": str,
                                                  "size": "float64"}, keep_default_na=False,
        )  # fmt: skip
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FedShopError(f"cannot read {path}: {_one_line(exc)}") from None
    missing = {"product", "item_id", "size"} - set(frame.columns)
    if missing:
        raise FedShopError(f"cannot read {path}: no column {', '.join(sorted(missing))}")
    if not np.array_equal(frame["product"].to_numpy(), np.arange(len(frame))):
        raise FedShopError(f"{path} does not list products 0 to {len(frame) - 1} in order")
    sizes = frame["size"].to_numpy(dtype=np.float64)
    if not np.isfinite(sizes).all():
        raise FedShopError(f"{path} has a product without a size")
    product_items = frame["item_id"].to_numpy(dtype=object).astype(str)
    item_ids = [str(i) for i in _id_order(product_items)]
    item_index = {item: index for index, item in enumerate(item_ids)}
    codes = np.array([item_index[i] for i in product_items], dtype=np.int64)
    order = np.lexsort((np.arange(len(sizes)), sizes, codes))  # by item, then size
    bounds = np.searchsorted(codes[order], np.arange(len(item_ids) + 1))
    of_item = [order[bounds[i] : bounds[i + 1]] for i in range(len(item_ids))]
    return Products(item_ids, item_index, sizes, of_item)


@dataclass(frozen=True)
class FitShop:
    """One shop's private state: its customers' own sizes."""

    name: str
    slug: str
    user_size: torch.Tensor  # (customers, K)
    user_bias: torch.Tensor  # (customers, 1)
    customer_ids: np.ndarray  # str per row
    row_of: dict[str, int]

    def private(self, row: int | None) -> Params:
        """One customer's row (None: a new shopper's, zeros), as single-row tables."""
        if row is None:
            return {
                "user_size": torch.zeros(1, self.user_size.shape[1]),
                "user_bias": torch.zeros(1, 1),
            }
        return {"user_size": self.user_size[row : row + 1], "user_bias": self.user_bias[row : row + 1]}  # fmt: skip


def read_fit_shop(models: Path, name: str, width: int) -> FitShop:
    """One shop's two private files (and nothing else)."""
    stem = models / f"silo-{slug(name)}"
    tables = _read_tensors(stem.with_name(stem.name + ".safetensors"))
    customers_path = stem.with_name(stem.name + ".customers.npz")
    ids = _read_npz(customers_path, ("customer_ids",))["customer_ids"].astype(str)
    for table in ("user_size", "user_bias"):
        if table not in tables:
            raise FedShopError(f"{stem}.safetensors has no '{table}' table")
    user_size = tables["user_size"].float()
    user_bias = tables["user_bias"].float().reshape(-1, 1)
    if user_size.dim() != 2 or user_size.shape[1] != width:
        raise FedShopError(
            f"{stem}.safetensors: user_size is {list(user_size.shape)}, the products' sizes "
            f"have {width} numbers each"
        )
    if len(user_size) != len(ids) or len(user_bias) != len(ids):
        raise FedShopError(
            f"{customers_path} does not match {stem.name}.safetensors ({len(ids)} customers, "
            f"{len(user_size)} size rows, {len(user_bias)} bias rows)"
        )
    return FitShop(name, slug(name), user_size, user_bias, ids,
                   {customer: row for row, customer in enumerate(ids)})  # fmt: skip


def _size_value(size: float) -> int | float:
    return int(size) if float(size).is_integer() else float(size)


def _text(name: str, value: str | None, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise InvalidRequestError(f"{name} is required")
        return None
    value = value.strip()
    if not value:
        raise InvalidRequestError(f"{name} must not be empty")
    if len(value) > MAX_ID:
        raise InvalidRequestError(f"{name} is longer than {MAX_ID} characters")
    return value


# ---- the model ---------------------------------------------------------------------------------------


class FitServingModel:
    """A fit run's federated model, its products, and the shops this server serves."""

    def __init__(
        self,
        run_dir: Path,
        serving: dict[str, Any],
        model: FitModel,
        shared: Params,
        products: Products,
        shops: dict[str, FitShop],
        only: str | None,
    ) -> None:
        self.run_dir = run_dir
        self.serving = serving
        self.model = model
        self.shared = shared
        self.products = products
        self.shops = shops  # by name, in the run's order
        self.only = only
        self.run_silos = [(s["name"], s["slug"]) for s in serving["silos"]]
        self.width = shared["product_size"].shape[1]
        # Which shops know each customer (in the run's order): shops are not linked, so one
        # shopper may have a row, her own size, in each of several.
        self.known_by: dict[str, list[str]] = {}
        for shop in shops.values():
            for customer in shop.row_of:
                self.known_by.setdefault(customer, []).append(shop.name)

    @classmethod
    def load(cls, run_dir: Path, silo: str | None = None) -> FitServingModel:
        """Load the fit run in `run_dir`, every shop or only `silo` (a name or slug).

        Raises FedShopError, one line saying what is wrong."""
        run_dir = Path(run_dir).expanduser()
        serving = read_fit_serving(run_dir)
        models = run_dir / "models" / "federated"
        names = [entry["name"] for entry in serving["silos"]]
        if silo is not None:
            wanted = [n for n, s in ((e["name"], e["slug"]) for e in serving["silos"])
                      if _names(n, s, silo)]  # fmt: skip
            if not wanted:
                raise FedShopError(
                    f"--silo {silo}: {run_dir} has no such shop; its shops: {', '.join(names)}"
                )
            names = wanted[:1]
        model = get_fit_model(serving["model"])
        shared_path = models / "shared.safetensors"
        shared = {k: v.float() for k, v in _read_tensors(shared_path).items()}
        needed = [*PRODUCT_TABLES, *ITEM_TABLES, "size_direction"]
        needed += ["weights", "thresholds"] if model.head == "lr" else ["projection", "prototypes"]
        missing = [name for name in needed if name not in shared]
        if missing:
            raise FedShopError(
                f"{shared_path} has no {', '.join(missing)} ({model.name} needs them)"
            )
        products = read_products(run_dir / PRODUCTS)
        if len(shared["product_size"]) != products.n_products:
            raise FedShopError(
                f"{shared_path} has {len(shared['product_size'])} products, {PRODUCTS} lists "
                f"{products.n_products}"
            )
        if len(shared["item_bias"]) != len(products.item_ids):
            raise FedShopError(
                f"{shared_path} has {len(shared['item_bias'])} items, {PRODUCTS} names "
                f"{len(products.item_ids)}"
            )
        width = shared["product_size"].shape[1]
        shops = {name: read_fit_shop(models, name, width) for name in names}
        return cls(run_dir, serving, model, shared, products, shops, names[0] if silo else None)

    @property
    def served(self) -> list[str]:
        return list(self.shops)

    def shop(self, name: str) -> FitShop:
        """A served shop by name or slug (any case); 403 for one of the run's that this server does
        not serve, 404 for a name the run does not have."""
        for run_name, run_slug in self.run_silos:
            if _names(run_name, run_slug, name):
                if run_name not in self.shops:
                    raise ForbiddenError(f"this server serves only {self.only}, not {run_name}")
                return self.shops[run_name]
        raise NotFoundError(
            f"no shop '{name}' in this run; its shops: " + ", ".join(n for n, _ in self.run_silos)
        )

    def item(self, item_id: str) -> int:
        try:
            return self.products.item_index[item_id]
        except KeyError:
            raise NotFoundError(f"no item '{item_id}' among this run's products") from None

    # ---- answers -------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "run": self.run_dir.resolve().name,
            "task": "fit",
            "model": self.serving["model"],
            "dim": self.serving["dim"],
            "items": len(self.products.item_ids),
            "products": self.products.n_products,
            "silos": self.served,
        }

    def silos(self) -> dict[str, Any]:
        return {"silos": [{"name": s.name, "slug": s.slug} for s in self.shops.values()]}

    def choose(self, customer: str, shop_name: str | None) -> tuple[FitShop | None, int | None]:
        """The shop whose copy of the customer's size answers, and her row there (None: a new
        shopper there, or anywhere when no shop is named and none knows her)."""
        if shop_name is not None:
            store = self.shop(shop_name)
            return store, store.row_of.get(customer)
        if self.only is not None:
            store = self.shops[self.only]
            return store, store.row_of.get(customer)
        knowing = self.known_by.get(customer, [])
        if len(knowing) > 1:
            raise RequestError(
                f"customer '{customer}' is known to several shops, each with its own size for "
                f"her: name one with shop= ({', '.join(knowing)})"
            )
        if knowing:
            store = self.shops[knowing[0]]
            return store, store.row_of[customer]
        return None, None

    def fit(
        self,
        customer: str | None,
        item: str | None,
        shop: str | None = None,
        size: str | None = None,
    ) -> dict[str, Any]:
        """P(small, fit, large) of each size of `item` for `customer`, the size most likely to fit
        and, with `size`, that size's answer."""
        customer = _text("customer", customer)
        item = _text("item", item)
        shop = _text("shop", shop, required=False)
        wanted = None
        if size is not None:
            text = _text("size", size)
            try:
                wanted = float(text)
            except ValueError:
                raise InvalidRequestError(f"size must be a number, got '{text}'") from None
            if not math.isfinite(wanted):
                raise InvalidRequestError(f"size must be a finite number, got '{text}'")
        index = self.item(item)
        store, row = self.choose(customer, shop)
        products = self.products.of_item[index]
        sizes = self.products.sizes[products]
        requested = None
        if wanted is not None:
            hits = np.flatnonzero(sizes == wanted)
            if not len(hits):
                listed = ", ".join(str(_size_value(s)) for s in sizes)
                raise NotFoundError(
                    f"item '{item}' has no size {_size_value(wanted)}; its sizes: {listed}"
                )
            requested = int(hits[0])
        probs = self.probabilities(store, row, index, products)
        rows = [
            {"size": _size_value(s), **{label: float(p[c]) for c, label in enumerate(LABELS)}}
            for s, p in zip(sizes, probs, strict=True)
        ]
        best = int(np.argmax(probs[:, 1]))  # the first (smallest) of equals
        answer: dict[str, Any] = {
            "customer": customer,
            "item": item,
            "shop": store.name if store is not None else None,
            "known_customer": row is not None,
            "sizes": rows,
            # A new shopper has no size yet (a zero vector scores every size alike): no advice
            # rather than the smallest size dressed up as one.
            "suggested_size": rows[best]["size"] if row is not None else None,
        }
        if requested is not None:
            answer["requested"] = rows[requested]
        return answer

    def probabilities(
        self, store: FitShop | None, row: int | None, item: int, products: np.ndarray
    ) -> np.ndarray:
        """(sizes, 3) P(small, fit, large) with the shop's row for the customer (zeros when none)."""
        if store is not None:
            private = store.private(row)
        else:
            private = {"user_size": torch.zeros(1, self.width), "user_bias": torch.zeros(1, 1)}
        n = len(products)
        batch = Batch(
            torch.zeros(n, dtype=torch.int64),
            torch.as_tensor(products, dtype=torch.int64),
            torch.full((n,), item, dtype=torch.int64),
            torch.zeros(n, dtype=torch.int64),
            torch.from_numpy(size_feature(self.products.sizes[products])),
        )
        result = probabilities(self.model, self.shared, private, None, batch)
        return result.reshape(n, CLASSES).double().numpy()


# ---- the API -----------------------------------------------------------------------------------------


def create_fit_app(model: FitServingModel) -> FastAPI:
    """The fit API over `model`: every answer JSON, every error `{"error": {status, message}}`."""
    from fedshop.serve.app import service_app

    app = service_app(
        model, "FedShop size and fit advice", f"Will this size fit, from run {model.run_dir.name}"
    )

    @app.get("/fit")
    def fit(
        customer: str | None = None,
        item: str | None = None,
        shop: str | None = None,
        size: str | None = None,
    ) -> dict[str, Any]:
        return model.fit(customer, item, shop, size)

    return app

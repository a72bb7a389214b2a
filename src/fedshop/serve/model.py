"""A finished run folder loaded for serving, and the questions a shopping guide answers with it.

What is loaded (serving format 1, see `report/run_folder.py`):
- public: `serving.json`, `catalogue.csv`, the shared item tables `models/federated/shared.safetensors`;
- private, per storefront (silo): its user tables `silo-<slug>.safetensors` (with its `silo_item_bias`
  row when the run trained one) and its customer map `silo-<slug>.customers.npz`.

With a storefront named (`--silo`), only that storefront's two private files are opened: the server
runs inside the storefront and never holds another storefront's customers. A customer is always
scored with their own storefront's private parameters.

Every ranking goes through one `Ranker` (`make_ranker`): exact scoring of the whole catalogue for a
catalogue below `IndexSettings.exact_below` items (and always for NeuMF), else a faiss index over
the shared item vectors (`serve/index.py`), built at start-up or loaded from `<run>/index/`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors

from fedshop import __version__
from fedshop.errors import FedShopError
from fedshop.experiment import slug
from fedshop.models.fold_in import contributions, fold_in, interaction_vectors
from fedshop.models.spec import ModelSpec, Params, get_model, score_all
from fedshop.report.run_folder import INCOMPLETE, MARKER, SERVING, SERVING_FORMAT
from fedshop.serve.index import (
    CatalogueIndex,
    IndexSettings,
    query_vectors,
    searches_exactly,
)

MAX_K = 100  # the most items one answer ranks (`k`, `limit`)
MAX_CUSTOMERS = 1000  # the most customer ids one /customers answer lists
EXPLANATIONS = 3  # past items named in "because you bought …"


# ---- errors -----------------------------------------------------------------------------------------


class RequestError(FedShopError):
    """A request the model cannot answer, with the HTTP status that says why."""

    status = 400


class NotFoundError(RequestError):
    """An unknown customer, item or storefront."""

    status = 404


class ForbiddenError(RequestError):
    """A customer or storefront this server does not serve (under `--silo`)."""

    status = 403


class InvalidRequestError(RequestError):
    """A value out of range, an empty basket."""

    status = 422


# ---- what was loaded ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    """The items, in the order of the rows of the item tables."""

    item_ids: np.ndarray  # str per item
    names: np.ndarray  # str per item
    prices: np.ndarray  # float per item, NaN where unknown
    index_of: dict[str, int]

    def __len__(self) -> int:
        return len(self.item_ids)

    def item(self, index: int) -> dict[str, Any]:
        price = float(self.prices[index])
        return {
            "item_id": str(self.item_ids[index]),
            "name": str(self.names[index]),
            "price": None if math.isnan(price) else price,
        }

    def lookup(self, item_id: str) -> int:
        try:
            return self.index_of[str(item_id)]
        except KeyError:
            raise NotFoundError(f"no item '{item_id}' in the catalogue") from None


@dataclass(frozen=True)
class Storefront:
    """One silo's private state: its customers' user tables and purchases, its item offsets."""

    name: str
    slug: str
    user_tables: Params  # one row per customer, in the order of `customer_ids`
    item_offsets: torch.Tensor | None  # (n_items,): the silo's private item-bias row, if trained
    customer_ids: np.ndarray  # str per row
    history_indptr: np.ndarray  # CSR of each customer's training purchases
    history_items: np.ndarray
    row_of: dict[str, int]

    def history(self, row: int) -> np.ndarray:
        return self.history_items[self.history_indptr[row] : self.history_indptr[row + 1]]

    def user(self, row: int) -> Params:
        return {name: table[row : row + 1] for name, table in self.user_tables.items()}


# ---- ranking: the one place scoring happens -----------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """What to rank the catalogue for: a shopper's user tables (one row each) and, at a known
    storefront, its private item offsets."""

    user: Params
    offsets: torch.Tensor | None = None


@dataclass(frozen=True)
class Ranked:
    items: np.ndarray  # item indices, best first
    scores: np.ndarray  # their scores


class Ranker(Protocol):
    def top_k(self, query: Query, k: int, exclude: np.ndarray) -> Ranked:
        """The `k` best items for `query` that are not in `exclude`, best first."""
        ...


def catalogue_scores(spec: ModelSpec, shared: Params, query: Query) -> torch.Tensor:
    """The model's score of every item for `query`: (n_items,)."""
    private = dict(query.user)
    if query.offsets is not None:
        private["silo_item_bias"] = query.offsets.reshape(1, -1)
    with torch.no_grad():
        return score_all(spec, shared, private, torch.zeros(1, dtype=torch.int64))[0]


def top_k_excluding(scores: torch.Tensor, k: int, exclude: np.ndarray) -> Ranked:
    """The `k` highest of `scores` outside `exclude` (fewer when the catalogue runs out)."""
    scores = scores.detach().float().clone()
    if len(exclude):
        scores[torch.as_tensor(exclude, dtype=torch.int64)] = -math.inf
    available = len(scores) - len(np.unique(exclude))
    values, indices = torch.topk(scores, min(k, max(available, 0)))
    return Ranked(indices.numpy().astype(np.int64), values.numpy().astype(np.float64))


@dataclass(frozen=True)
class ExactRanker:
    """Scores the whole catalogue: one matrix-vector product for MF and GMF."""

    spec: ModelSpec
    shared: Params

    def top_k(self, query: Query, k: int, exclude: np.ndarray) -> Ranked:
        return top_k_excluding(catalogue_scores(self.spec, self.shared, query), k, exclude)


@dataclass(frozen=True)
class IndexRanker:
    """Ranks with a faiss index over the shared item vectors; a storefront's offsets re-rank the
    index's k + margin candidates exactly."""

    spec: ModelSpec
    shared: Params
    index: CatalogueIndex

    def top_k(self, query: Query, k: int, exclude: np.ndarray) -> Ranked:
        vector = query_vectors(self.spec, self.shared, query.user)
        offsets = None if query.offsets is None else query.offsets.detach().float().numpy()
        found = self.index.search(vector, k, [exclude], offsets)
        kept = found.items[0] >= 0
        return Ranked(found.items[0][kept], found.scores[0][kept].astype(np.float64))


def make_ranker(
    spec: ModelSpec,
    shared: Params,
    settings: IndexSettings | None = None,
    cache_dir: Path | None = None,
) -> tuple[Ranker, CatalogueIndex | None]:
    """How this server ranks: exactly below `settings.exact_below` items (or when asked, and
    always for NeuMF), else with a faiss index, cached in `cache_dir`; and that index (None when
    exact)."""
    settings = settings or IndexSettings()
    if searches_exactly(spec, settings, shared[spec.item_tables[0]].shape[0]):
        return ExactRanker(spec, shared), None
    index = CatalogueIndex.for_model(spec, shared, settings, cache_dir)
    return IndexRanker(spec, shared, index), index


def cosine_vectors(spec: ModelSpec, shared: Params) -> torch.Tensor:
    """Unit-length interaction vectors: "similar items" are those buying one speaks most for."""
    vectors = interaction_vectors(spec, shared).detach()
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


def because(vectors: torch.Tensor, history: np.ndarray, item: int) -> list[tuple[int, float]]:
    """The past items (indices into the catalogue) that speak most for `item`, with their weights:
    up to `EXPLANATIONS`, each with a positive weight."""
    if len(history) == 0:
        return []
    weights = contributions(vectors, torch.as_tensor(history, dtype=torch.int64), item)
    order = torch.argsort(weights, descending=True, stable=True)[:EXPLANATIONS]
    return [(int(history[i]), float(weights[i])) for i in order if weights[i] > 0]


def check_count(name: str, value: int, most: int = MAX_K) -> int:
    if not 1 <= value <= most:
        raise InvalidRequestError(f"{name} must be between 1 and {most}, got {value}")
    return value


# ---- the model ---------------------------------------------------------------------------------------


class ServingModel:
    """A run folder's federated model, the catalogue, and the storefronts this server serves."""

    def __init__(
        self,
        run_dir: Path,
        serving: dict[str, Any],
        spec: ModelSpec,
        shared: Params,
        catalogue: Catalogue,
        storefronts: dict[str, Storefront],
        only: str | None,
        index: IndexSettings | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.serving = serving
        self.spec = spec
        self.shared = shared
        self.catalogue = catalogue
        self.storefronts = storefronts  # by name, in the run's order
        self.only = only  # the one storefront served under --silo, else None
        self.run_silos = [(s["name"], s["slug"]) for s in serving["silos"]]
        self.vectors = interaction_vectors(spec, shared).detach()
        self.unit_vectors = cosine_vectors(spec, shared)
        self.ranker, self.index = make_ranker(spec, shared, index, run_dir / "index")
        # Each customer's storefront; ids are the shops' own, so one could recur across shops:
        # the first storefront keeps it (the data sets here number customers once).
        self.owner: dict[str, str] = {}
        for store in reversed(storefronts.values()):
            self.owner.update(dict.fromkeys(store.row_of, store.name))
        self.popularity = np.bincount(
            np.concatenate([s.history_items for s in storefronts.values()] + [np.zeros(0, int)]),
            minlength=len(catalogue),
        )

    @classmethod
    def load(
        cls, run_dir: Path, silo: str | None = None, index: IndexSettings | None = None
    ) -> ServingModel:
        """Load `run_dir` for serving, every storefront or only `silo` (a name or slug), ranking as
        `index` says.

        Raises FedShopError, one line saying what is wrong, for a folder that is missing, half
        written, from an older fedshop, without a federated model, or with a file that does not
        parse; and for a `silo` the run does not have."""
        run_dir = Path(run_dir).expanduser()
        serving = read_serving(run_dir)
        models = run_dir / "models" / "federated"
        names = [entry["name"] for entry in serving["silos"]]
        if silo is not None:
            names = [find_silo(serving, silo, run_dir)]
        spec = _model_spec(serving, run_dir)
        shared = _read_tensors(models / "shared.safetensors")
        _check_shared(spec, shared, serving, run_dir)
        catalogue = read_catalogue(run_dir / "catalogue.csv", serving["n_items"])
        storefronts = {}
        for name in names:
            storefronts[name] = read_storefront(models, name, spec, serving["n_items"])
        only = names[0] if silo else None
        return cls(run_dir, serving, spec, shared, catalogue, storefronts, only, index)

    # ---- lookups -----------------------------------------------------------------------------------

    @property
    def served(self) -> list[str]:
        return list(self.storefronts)

    def storefront(self, name: str) -> Storefront:
        """A served storefront by name or slug (any case); 403 for one of the run's that this server
        does not serve, 404 for a name the run does not have."""
        for run_name, run_slug in self.run_silos:
            if _names(run_name, run_slug, name):
                if run_name not in self.storefronts:
                    raise ForbiddenError(f"this server serves only {self.only}, not {run_name}")
                return self.storefronts[run_name]
        raise NotFoundError(
            f"no storefront '{name}' in this run; its storefronts: "
            + ", ".join(n for n, _ in self.run_silos)
        )

    def customer(self, customer_id: str) -> tuple[Storefront, int]:
        """The customer's storefront and row. Under --silo any id outside that storefront's map is
        refused (403): whether it is another storefront's customer or nobody's is not this server's
        to know, nor to say."""
        customer_id = str(customer_id).strip()
        owner = self.owner.get(customer_id)
        if owner is None:
            if self.only is not None:
                raise ForbiddenError(f"customer '{customer_id}' is not a customer of {self.only}")
            raise NotFoundError(f"no customer '{customer_id}' in this run")
        store = self.storefronts[owner]
        return store, store.row_of[customer_id]

    # ---- answers (JSON-ready dicts, the API's bodies) ------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "run": self.run_dir.resolve().name,
            "model": self.serving["model"],
            "mode": self.serving["mode"],
            "items": len(self.catalogue),
            "silos": self.served,
        }

    def silos(self) -> dict[str, Any]:
        return {"silos": [{"name": s.name, "slug": s.slug} for s in self.storefronts.values()]}

    def customers(self, silo: str | None = None, limit: int = 50) -> dict[str, Any]:
        """Customer ids of a served storefront (the first served one when none is named)."""
        check_count("limit", limit, MAX_CUSTOMERS)
        store = self.storefront(silo) if silo else next(iter(self.storefronts.values()))
        return {"silo": store.name, "customers": [str(c) for c in store.customer_ids[:limit]]}

    def recommend(self, customer_id: str, k: int = 10) -> dict[str, Any]:
        """Top-k for a known customer: their own vector and storefront offsets, nothing they bought
        in training, each with the past purchases that speak most for it."""
        check_count("k", k)
        store, row = self.customer(customer_id)
        history = store.history(row)
        ranked = self.ranker.top_k(Query(store.user(row), store.item_offsets), k, history)
        return {
            "customer": str(store.customer_ids[row]),
            "silo": store.name,
            "k": k,
            "items": self._ranked_items(ranked, history),
        }

    def fold_in_basket(self, basket: np.ndarray, store: Storefront | None) -> Query:
        """A new shopper's query: a user vector folded in from the basket against the frozen shared
        tables (and the storefront's offsets, when the shopper is at one)."""
        offsets = store.item_offsets if store is not None else None
        user = fold_in(self.spec, self.shared, torch.as_tensor(basket), item_offsets=offsets)
        return Query(user, offsets)

    def recommend_basket(
        self, item_ids: list[str], k: int = 10, silo: str | None = None
    ) -> dict[str, Any]:
        """Top-k for an anonymous shopper with this basket, outside the basket."""
        check_count("k", k)
        if not item_ids:
            raise InvalidRequestError("the basket is empty: give at least one item id")
        basket = np.array(
            list(dict.fromkeys(self.catalogue.lookup(i) for i in item_ids)), dtype=np.int64
        )
        store = self.storefront(silo) if silo else None
        ranked = self.ranker.top_k(self.fold_in_basket(basket, store), k, basket)
        return {
            "silo": store.name if store else None,
            "k": k,
            "basket": [self.catalogue.item(i) for i in basket],
            "items": self._ranked_items(ranked, basket),
        }

    def similar(self, item_id: str, k: int = 10) -> dict[str, Any]:
        """The items whose interaction vectors point most nearly the same way (cosine)."""
        check_count("k", k)
        index = self.catalogue.lookup(item_id)
        cosines = self.unit_vectors @ self.unit_vectors[index]
        ranked = top_k_excluding(cosines, k, np.array([index]))
        return {
            "item": self.catalogue.item(index),
            "items": [
                {**self.catalogue.item(i), "score": float(s)}
                for i, s in zip(ranked.items, ranked.scores, strict=True)
            ],
        }

    def search(self, q: str = "", limit: int = 20) -> dict[str, Any]:
        """Items whose name or id contains `q` (any case), the most bought first (by the served
        storefronts' customers); an empty `q` lists the most bought."""
        check_count("limit", limit)
        hits = np.arange(len(self.catalogue))
        text = q.strip().lower()
        if text:
            in_name = np.char.find(np.char.lower(self.catalogue.names.astype(str)), text) >= 0
            in_id = np.char.find(np.char.lower(self.catalogue.item_ids.astype(str)), text) >= 0
            hits = np.flatnonzero(in_name | in_id)
        order = hits[np.argsort(-self.popularity[hits], kind="stable")][:limit]
        return {"items": [self.catalogue.item(i) for i in order]}

    def _ranked_items(self, ranked: Ranked, history: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for item, score in zip(ranked.items, ranked.scores, strict=True):
            reasons = [
                {**_named(self.catalogue.item(j)), "weight": weight}
                for j, weight in because(self.vectors, history, int(item))
            ]
            out.append({**self.catalogue.item(item), "score": float(score), "because": reasons})
        return out


def _names(name: str, silo_slug: str, wanted: str) -> bool:
    """Whether `wanted` names the silo: its name in any case, or its slug."""
    return wanted.strip().lower() == name.lower() or slug(wanted) == silo_slug


def _named(item: dict[str, Any]) -> dict[str, Any]:
    return {"item_id": item["item_id"], "name": item["name"]}


# ---- reading the run folder --------------------------------------------------------------------------


def read_serving_file(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics.json, serving.json) of a finished run folder, after the checks that say why a
    folder cannot be served (either task's)."""
    if not run_dir.exists():
        raise FedShopError(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise FedShopError(f"{run_dir} is not a folder (give the run folder that training wrote)")
    incomplete = run_dir / INCOMPLETE
    if incomplete.exists():
        reason = _first_line(incomplete) or "it has no reason recorded"
        raise FedShopError(
            f"{run_dir} is a half-written run, not served ({INCOMPLETE}: {reason}); train again"
        )
    if not (run_dir / MARKER).is_file():
        raise FedShopError(f"{run_dir} is not a run folder (it has no {MARKER})")
    metrics = _read_json(run_dir / MARKER)
    if not (run_dir / SERVING).is_file():
        raise FedShopError(
            f"{run_dir} was written by fedshop {metrics.get('fedshop_version', '(unknown)')}, "
            f"which did not write {SERVING}; re-run training with fedshop {__version__} to serve it"
        )
    serving = _read_json(run_dir / SERVING)
    written = serving.get("format")
    if written != SERVING_FORMAT:
        raise FedShopError(
            f"{run_dir / SERVING} is serving format {written}, written by fedshop "
            f"{metrics.get('fedshop_version', '(unknown)')}; this fedshop ({__version__}) serves "
            f"format {SERVING_FORMAT}: re-run training with it"
        )
    return metrics, serving


def read_serving(run_dir: Path) -> dict[str, Any]:
    """serving.json of a recommendation run, after the checks that say why it cannot be served."""
    metrics, serving = read_serving_file(run_dir)
    if serving.get("task") == "fit":
        raise FedShopError(
            f"{run_dir} is a fit run: load it with fedshop.serve.fit.FitServingModel "
            "(`fedshop serve` does)"
        )
    try:
        silos = [{"name": str(s["name"]), "slug": str(s["slug"])} for s in serving["silos"]]
        serving = {
            **serving,
            "model": str(serving["model"]),
            "mode": str(serving["mode"]),
            "n_items": int(serving["n_items"]),
            "silos": silos,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise FedShopError(f"cannot read {run_dir / SERVING}: bad or missing {exc}") from None
    if serving["model"] == "sasrec":
        raise FedShopError(
            f"{run_dir} holds a sasrec run: `fedshop serve` serves user-vector models (mf-bpr, "
            "gmf, neumf), not sequential ones; SASRec scores a shopper's item sequence"
        )
    shared = run_dir / "models" / "federated" / "shared.safetensors"
    if not silos or not shared.is_file():
        methods = [
            m for m in ("federated", "centralized", "local_only", "popularity") if m in metrics
        ]
        raise FedShopError(
            f"{run_dir} has no federated model to serve (its methods: {', '.join(methods) or 'none'}"
            "); train with the federated method"
        )
    return serving


def find_silo(serving: dict[str, Any], wanted: str, run_dir: Path) -> str:
    """The run's silo named `wanted` (its name or slug, any case)."""
    for silo in serving["silos"]:
        if _names(silo["name"], silo["slug"], wanted):
            return silo["name"]
    names = ", ".join(s["name"] for s in serving["silos"])
    raise FedShopError(f"--silo {wanted}: {run_dir} has no such silo; its silos: {names}")


def read_catalogue(path: Path, n_items: int) -> Catalogue:
    if not path.is_file():
        raise FedShopError(f"{path} is missing: the catalogue is needed to name the items")
    try:
        frame = pd.read_csv(
            io.BytesIO(path.read_bytes()),
            dtype={"index": "int64", "item_id": str, "name": str, "price": "float64"},
            keep_default_na=False,
            na_values={"price": [""]},
        )
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FedShopError(f"cannot read {path}: {_one_line(exc)}") from None
    missing = {"index", "item_id", "name", "price"} - set(frame.columns)
    if missing:
        raise FedShopError(f"cannot read {path}: no column {', '.join(sorted(missing))}")
    if not np.array_equal(frame["index"].to_numpy(), np.arange(n_items)):
        raise FedShopError(
            f"{path} does not list items 0 to {n_items - 1} in order (the model has {n_items})"
        )
    item_ids = frame["item_id"].to_numpy(dtype=object)
    return Catalogue(
        item_ids=item_ids,
        names=frame["name"].to_numpy(dtype=object),
        prices=frame["price"].to_numpy(dtype=np.float64),
        index_of={str(item): index for index, item in enumerate(item_ids)},
    )


def read_storefront(models: Path, name: str, spec: ModelSpec, n_items: int) -> Storefront:
    """One silo's two private files (and nothing else)."""
    stem = models / f"silo-{slug(name)}"
    tables = _read_tensors(stem.with_name(stem.name + ".safetensors"))
    customers_path = stem.with_name(stem.name + ".customers.npz")
    customers = _read_npz(customers_path, ("customer_ids", "history_indptr", "history_items"))
    ids = customers["customer_ids"].astype(str)
    indptr = customers["history_indptr"].astype(np.int64)
    items = customers["history_items"].astype(np.int64)
    user_tables = {}
    for table in spec.user_tables:
        if table not in tables:
            raise FedShopError(f"{stem}.safetensors has no '{table}' table ({spec.name} needs it)")
        user_tables[table] = tables[table].float()
    rows = {len(t) for t in user_tables.values()}
    if rows != {len(ids)} or len(indptr) != len(ids) + 1 or indptr[-1] != len(items):
        raise FedShopError(
            f"{customers_path} does not match {stem.name}.safetensors ({len(ids)} customers, "
            f"{sorted(rows)} user rows)"
        )
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        raise FedShopError(f"{customers_path} names items outside the catalogue of {n_items}")
    offsets = tables.get("silo_item_bias")
    if offsets is not None:
        offsets = offsets.float().reshape(-1)
        if len(offsets) != n_items:
            raise FedShopError(f"{stem}.safetensors: silo_item_bias does not cover {n_items} items")
    return Storefront(
        name=name,
        slug=slug(name),
        user_tables=user_tables,
        item_offsets=offsets,
        customer_ids=ids,
        history_indptr=indptr,
        history_items=items,
        row_of={customer: row for row, customer in enumerate(ids)},
    )


def _model_spec(serving: dict[str, Any], run_dir: Path) -> ModelSpec:
    try:
        return get_model(serving["model"])
    except FedShopError as exc:
        raise FedShopError(f"{run_dir / SERVING}: {exc}") from None


def _check_shared(spec: ModelSpec, shared: Params, serving: dict[str, Any], run_dir: Path) -> None:
    missing = [name for name in spec.item_tables if name not in shared]
    path = run_dir / "models" / "federated" / "shared.safetensors"
    if missing:
        raise FedShopError(f"{path} has no {', '.join(missing)} ({spec.name} needs them)")
    rows = len(shared[spec.item_tables[0]])
    if rows != serving["n_items"]:
        raise FedShopError(f"{path} has {rows} items, {SERVING} says {serving['n_items']}")


def _read_bytes(path: Path) -> bytes:
    # Read through Python's open (not safetensors' or numpy's own), so every file the server opens
    # is one a reader of the process (and its audit hooks) sees.
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FedShopError(f"{path} is missing") from None
    except OSError as exc:
        raise FedShopError(f"cannot read {path}: {exc.strerror}") from None


def _read_tensors(path: Path) -> Params:
    data = _read_bytes(path)
    try:
        return load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise FedShopError(f"cannot read {path}: {_one_line(exc)}") from None


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    data = _read_bytes(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            missing = [key for key in keys if key not in archive]
            if missing:
                raise FedShopError(f"cannot read {path}: no {', '.join(missing)}")
            return {key: archive[key] for key in keys}
    except FedShopError:
        raise
    except Exception as exc:  # a damaged zip, an object array (pickle refused)
        raise FedShopError(f"cannot read {path}: {_one_line(exc)}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FedShopError(f"cannot read {path}: {_one_line(exc)}") from None
    if not isinstance(value, dict):
        raise FedShopError(f"cannot read {path}: not a JSON object")
    return value


def _first_line(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

"""Top-k search over the catalogue: exact scoring for small catalogues, a faiss index for large ones.

MF and GMF score a customer against an item with an inner product once both are augmented:

    MF:   s(u, i) = <u, q_i> + b_i      = <[u, 1],     [q_i, b_i]>
    GMF:  s(u, i) = <u ⊙ w, q_i> + b_i  = <[u ⊙ w, 1], [q_i, b_i]>

so top-k recommendation is maximum-inner-product search (MIPS) over the augmented item matrix, which
is shared (the same for every storefront and every customer). A storefront's private `silo_item_bias`
row is added on top: the index ranks on the shared part for k + `margin` candidates and those are
re-ranked exactly with the offsets (what this costs in recall is measured in benchmarks/serving.py).

Below `exact_below` items (50,000) the search is exact: one matrix-vector product and a partial sort,
about 1 ms at 50,000 items on one core, but it grows with the matrix that every query reads (2 ms at
100,000, 41 ms at 1,000,000). Above, a faiss index: IVF-Flat (default) or HNSW. Both search the items
after the MIPS-to-nearest-neighbour reduction (`l2_reduction`), which on a trained model's vectors
finds far more of the exact top 10 than faiss's inner-product metric does (IVF at 1M items: 0.98 vs
0.68 at the same cost). IVF clusters the items (k-means) and scans the `nprobe` clusters nearest the
query; HNSW walks a graph. IVF was chosen on the numbers (benchmarks/serving.py): at 1M items it
builds in ~25 s against minutes, takes half the memory, and is as fast for a ≥0.97 recall@10. The
index is built at start-up or loaded from `<cache_dir>/<hash>.faiss`, the hash covering the
vectors, the build settings and the faiss version, so a cache made for other vectors is never used.

NeuMF's score goes through an MLP and is not an inner product: NeuMF is always scored exactly (its
query is the concatenation of the user tables, scored by the model's own `pair_scores`).

Items a customer already bought are excluded inside the search (a faiss ID selector), so the search
does not need extra candidates for them, however long the history.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from fedshop.errors import ConfigError
from fedshop.models.spec import ModelSpec, Params
from fedshop.storage.private_files import private_writer

KINDS = ("auto", "exact", "hnsw", "ivf")
MAX_K = 100


@dataclass(frozen=True)
class IndexSettings:
    """How to search a catalogue. `auto`: exact below `exact_below` items, else `approximate`."""

    kind: str = "auto"
    exact_below: int = 50_000
    approximate: str = "ivf"
    # "l2-reduction": the faiss index searches items made equal-norm (see `l2_reduction`) by L2
    # distance; "inner-product": faiss's inner-product metric on the items as they are.
    metric: str = "l2-reduction"
    # Candidates beyond k fetched from the shared index and re-ranked with a storefront's offsets.
    margin: int = 100
    # HNSW: links per node, candidate list while building and while searching.
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 256
    # IVF-Flat: clusters (0: 4·√n), items per cluster k-means trains on (a sample), clusters
    # scanned per query.
    ivf_nlist: int = 0
    ivf_train_per_list: int = 64
    ivf_nprobe: int = 48

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.approximate not in ("hnsw", "ivf"):
            raise ConfigError(f"approximate index {self.approximate!r} is not hnsw or ivf")
        if self.metric not in ("l2-reduction", "inner-product"):
            raise ConfigError(f"index metric {self.metric!r} is not l2-reduction or inner-product")
        if self.exact_below < 0 or self.margin < 0:
            raise ConfigError("index exact_below and margin must not be negative")

    def kind_for(self, n_items: int) -> str:
        if self.kind == "auto":
            return "exact" if n_items < self.exact_below else self.approximate
        return self.kind

    def build_key(self, kind: str) -> dict:
        """The settings a built index depends on (search-time ones are not in the cache key)."""
        if kind == "hnsw":
            return {
                "kind": kind,
                "metric": self.metric,
                "m": self.hnsw_m,
                "ef_construction": self.hnsw_ef_construction,
            }
        if kind == "ivf":
            return {
                "kind": kind,
                "metric": self.metric,
                "nlist": self.ivf_nlist,
                "train_per_list": self.ivf_train_per_list,
            }
        return {"kind": kind}


# ---- the augmented vectors (pure functions) -----------------------------------------------------


def is_inner_product(spec: ModelSpec) -> bool:
    """Whether the model's score is an inner product of augmented vectors (MF, GMF; not NeuMF)."""
    return spec.name in ("mf-bpr", "gmf")


def item_vectors(spec: ModelSpec, shared: Params) -> np.ndarray:
    """The catalogue's search vectors, float32 (n_items, width): MF/GMF [q_i, b_i]; NeuMF the item
    tables side by side (scored exactly by the model, not by inner product)."""
    if is_inner_product(spec):
        parts = [shared["item_embedding"], shared["item_bias"].reshape(-1, 1)]
    else:
        parts = [shared[name].reshape(shared[name].shape[0], -1) for name in spec.item_tables]
    return np.ascontiguousarray(torch.cat([p.detach().float() for p in parts], 1).numpy())


def query_vectors(spec: ModelSpec, shared: Params, users: Params) -> np.ndarray:
    """One search vector per row of the user tables `users`, float32 (n_users, width): MF [u, 1],
    GMF [u ⊙ w, 1]; NeuMF the user tables side by side."""
    if is_inner_product(spec):
        u = users["user_embedding"].detach().float()
        if spec.name == "gmf":
            u = u * shared["output_weight"].detach().float()
        parts = [u, torch.ones(u.shape[0], 1)]
    else:
        parts = [users[name].detach().float() for name in spec.user_tables]
    return np.ascontiguousarray(torch.cat(parts, 1).numpy())


def searches_exactly(spec: ModelSpec, settings: IndexSettings, n_items: int) -> bool:
    """Whether a catalogue of `n_items` is searched exactly: below the size, when asked, and always
    for a model that is not an inner product (asking for an index for one is an error)."""
    if not is_inner_product(spec):
        if settings.kind in ("hnsw", "ivf"):
            raise ConfigError(
                f"{spec.name} scores through an MLP, not an inner product: only exact scoring "
                "serves it (index kind auto or exact)"
            )
        return True
    return settings.kind_for(n_items) == "exact"


def _model_scorer(spec: ModelSpec, shared: Params) -> Callable[[np.ndarray], np.ndarray]:
    """Exact scores (m, n_items) of query vectors for a model that is not an inner product."""
    items = {name: shared[name].detach().float().unsqueeze(0) for name in spec.item_tables}
    dense = {k: v.detach().float() for k, v in spec.dense_of(shared).items()}
    widths = [shared[name].shape[1] for name in spec.item_tables if shared[name].dim() == 2]
    n_items = shared[spec.item_tables[0]].shape[0]

    def scores(queries: np.ndarray) -> np.ndarray:
        split = torch.from_numpy(queries).split(widths, dim=1)
        rows = []
        with torch.inference_mode():
            for r in range(len(queries)):
                user = {
                    n: part[r : r + 1].unsqueeze(1)
                    for n, part in zip(spec.user_tables, split, strict=True)
                }
                rows.append(spec.pair_scores(user, items, dense).reshape(-1))
        return torch.stack(rows).numpy() if rows else np.zeros((0, n_items), np.float32)

    return scores


# ---- the index ----------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Per query, item indices best first and their scores; rows padded with -1 / -inf where fewer
    than k items are left after exclusion."""

    items: np.ndarray  # (m, k) int64
    scores: np.ndarray  # (m, k) float32


@dataclass
class CatalogueIndex:
    vectors: np.ndarray  # (n_items, width) float32, what exact scoring and re-ranking use
    settings: IndexSettings
    kind: str  # "exact" or "hnsw" / "ivf"
    faiss_index: faiss.Index | None = None
    build_seconds: float = 0.0
    cache: str = "off"  # "off" (no cache folder), "hit", "miss" (built and written), "unwritable"
    cache_path: Path | None = None
    # Exact scores of query vectors; None: inner product with `vectors`.
    scorer: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    # Width of a query vector when it is not the items' (NeuMF: the user tables side by side).
    scorer_query_width: int | None = None

    @property
    def n_items(self) -> int:
        return len(self.vectors)

    @property
    def query_width(self) -> int:
        return self.scorer_query_width or self.vectors.shape[1]

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        settings: IndexSettings = IndexSettings(),
        cache_dir: str | Path | None = None,
    ) -> CatalogueIndex:
        """An index over inner-product item vectors (rows of `vectors`)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        kind = settings.kind_for(len(vectors))
        if kind == "exact":
            return cls(vectors, settings, kind)
        started = time.perf_counter()
        cache, path, index = "off", None, None
        if cache_dir is not None:
            path = Path(cache_dir) / f"{cache_key(vectors, settings.build_key(kind))}.faiss"
            width = vectors.shape[1] + (settings.metric == "l2-reduction")
            index = _load_cached(path, len(vectors), width)
            cache = "hit" if index is not None else "miss"
        if index is None:
            index = build_faiss(vectors, settings, kind)
            if path is not None:
                try:
                    with private_writer(path) as f:
                        f.write(faiss.serialize_index(index).tobytes())
                except OSError:
                    cache = "unwritable"  # a read-only run folder: serve anyway, build each start
        _apply_search_settings(index, settings)
        seconds = time.perf_counter() - started
        return cls(vectors, settings, kind, index, seconds, cache, path)

    @classmethod
    def for_model(
        cls,
        spec: ModelSpec,
        shared: Params,
        settings: IndexSettings = IndexSettings(),
        cache_dir: str | Path | None = None,
    ) -> CatalogueIndex:
        """The index a served model ranks with; NeuMF is scored exactly whatever the settings."""
        vectors = item_vectors(spec, shared)
        if not searches_exactly(spec, settings, len(vectors)):
            return cls.build(vectors, settings, cache_dir)
        if is_inner_product(spec):
            return cls(vectors, settings, "exact")
        width = sum(shared[name].shape[1] for name in spec.item_tables if shared[name].dim() == 2)
        scorer = _model_scorer(spec, shared)
        return cls(vectors, settings, "exact", scorer=scorer, scorer_query_width=width)

    def exact_scores(self, queries: np.ndarray) -> np.ndarray:
        """Scores (m, n_items) of every item for each query vector (float32)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.query_width)
        if self.scorer is not None:
            return self.scorer(queries)
        return queries @ self.vectors.T

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[np.ndarray | Sequence[int]] | None = None,
        offsets: np.ndarray | None = None,
    ) -> SearchResult:
        """Top `k` items for each query vector (rows of `queries`), never an item of its `exclude`
        entry; `offsets` (n_items,) or (m, n_items) are added to the scores (a storefront's private
        item biases): exact in the exact path, a re-ranking of k + margin candidates otherwise."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.query_width)
        m = len(queries)
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, not {k}")
        excluded = [_as_ids(exclude[r] if exclude is not None else ()) for r in range(m)]
        offset_rows = None if offsets is None else np.broadcast_to(
            np.asarray(offsets, dtype=np.float32), (m, self.n_items)
        )  # fmt: skip
        items = np.full((m, k), -1, dtype=np.int64)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        if self.faiss_index is None:
            all_scores = self.exact_scores(queries)
            if offset_rows is not None:
                all_scores = all_scores + offset_rows
            for r in range(m):
                row = all_scores[r]
                row[excluded[r]] = -np.inf
                best = _top(row, k)
                items[r, : len(best)], scores[r, : len(best)] = best, row[best]
            return SearchResult(items, scores)
        wanted = k + (self.settings.margin if offset_rows is not None else 0)
        for r in range(m):
            candidates = self._candidates(queries[r : r + 1], wanted, excluded[r])
            # Exact scores of the candidates (faiss's are float32 sums in another order), then
            # the storefront's offsets on top.
            cand_scores = self.vectors[candidates] @ queries[r]
            if offset_rows is not None:
                cand_scores = cand_scores + offset_rows[r, candidates]
            order = np.argsort(-cand_scores, kind="stable")[:k]
            items[r, : len(order)] = candidates[order]
            scores[r, : len(order)] = cand_scores[order]
        return SearchResult(items, scores)

    def _candidates(self, query: np.ndarray, wanted: int, excluded: np.ndarray) -> np.ndarray:
        wanted = min(wanted, self.n_items)
        params = _search_parameters(self.kind, self.settings, wanted)
        if len(excluded):
            # Both kept in locals: faiss holds raw pointers to them during the search.
            bought = faiss.IDSelectorBatch(excluded)
            selector = faiss.IDSelectorNot(bought)
            params.sel = selector
        if self.settings.metric == "l2-reduction":
            query = np.hstack([query, np.zeros((len(query), 1), np.float32)])
        _, ids = self.faiss_index.search(query, wanted, params=params)
        ids = ids[0]
        return ids[ids >= 0]


def _as_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    return np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))


def _top(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite entries of `row`, largest first (ties by index)."""
    k = min(k, len(row))
    part = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
    part = part[np.isfinite(row[part])]
    return part[np.lexsort((part, -row[part]))]


# ---- faiss ---------------------------------------------------------------------------------------


def default_nlist(n_items: int) -> int:
    return max(1, min(n_items // 39, int(4 * np.sqrt(n_items))))


def l2_reduction(vectors: np.ndarray) -> np.ndarray:
    """Items x ↦ [x, √(R² − ‖x‖²)], R the largest norm (Bachrach et al., RecSys 2014): every item
    then has norm R, so for a query [q, 0] the distance ‖[q, 0] − x'‖² = ‖q‖² + R² − 2⟨q, x⟩ ranks
    items exactly as the inner product does, and a metric index (whose graph or clusters assume
    a distance) can search it."""
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    extra = np.sqrt(np.maximum(norms.max(initial=0.0) ** 2 - norms**2, 0.0))
    return np.ascontiguousarray(np.hstack([vectors, extra[:, None]]), dtype=np.float32)


def build_faiss(vectors: np.ndarray, settings: IndexSettings, kind: str) -> faiss.Index:
    if settings.metric == "l2-reduction":
        vectors, metric = l2_reduction(vectors), faiss.METRIC_L2
    else:
        metric = faiss.METRIC_INNER_PRODUCT
    n, width = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(width, settings.hnsw_m, metric)
        index.hnsw.efConstruction = settings.hnsw_ef_construction
        index.add(vectors)
        return index
    if kind == "ivf":
        nlist = settings.ivf_nlist or default_nlist(n)
        flat = faiss.IndexFlatL2 if metric == faiss.METRIC_L2 else faiss.IndexFlatIP
        quantizer = flat(width)
        index = faiss.IndexIVFFlat(quantizer, width, nlist, metric)
        index.cp.seed = 0  # k-means from a fixed seed: the same vectors give the same index
        index.cp.max_points_per_centroid = settings.ivf_train_per_list
        index.train(vectors)
        index.add(vectors)
        return index
    raise ConfigError(f"no faiss index of kind {kind!r}")


def _apply_search_settings(index: faiss.Index, settings: IndexSettings) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = settings.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = settings.ivf_nprobe


def _search_parameters(kind: str, settings: IndexSettings, wanted: int):
    if kind == "hnsw":
        # The candidate list must hold at least the results asked for.
        return faiss.SearchParametersHNSW(efSearch=max(settings.hnsw_ef_search, wanted))
    return faiss.SearchParametersIVF(nprobe=settings.ivf_nprobe)


def cache_key(vectors: np.ndarray, build: dict) -> str:
    """A hash of everything a built index depends on: the vectors, the build settings, faiss."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps({**build, "faiss": faiss.__version__, "shape": vectors.shape}).encode()
    )
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return digest.hexdigest()[:32]


def _load_cached(path: Path, n_items: int, width: int) -> faiss.Index | None:
    """The index in `path` when it is ours, not writable by others and of the expected size."""
    try:
        info = path.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None  # someone else could have written it: build afresh (and replace it)
    try:
        index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
    except (RuntimeError, OSError, ValueError):
        return None  # a damaged file: build afresh
    if index.ntotal != n_items or index.d != width:
        return None
    return index


def recall_at_k(
    index: CatalogueIndex,
    queries: np.ndarray,
    k: int,
    exact: CatalogueIndex | np.ndarray,
    exclude: Sequence[np.ndarray] | None = None,
    offsets: np.ndarray | None = None,
) -> float:
    """Mean fraction of the exact top-k (an exact index, or its result items (m, k)) that `index`
    returns, over the rows of `queries`."""
    got = index.search(queries, k, exclude, offsets).items
    if isinstance(exact, CatalogueIndex):
        exact = exact.search(queries, k, exclude, offsets).items
    hits = [
        len(np.intersect1d(g[g >= 0], e[e >= 0])) / max(1, int((e >= 0).sum()))
        for g, e in zip(got, exact, strict=True)
    ]
    return float(np.mean(hits)) if hits else float("nan")

"""The web page served by the same app: a shopper view and an operator view, plain files in static/.

Routes (added to the API's app by `create_app`):
- `GET /` the page, `GET /static/…` its script and style (no build step, nothing from the internet).
- `GET /api/model` + `GET /api/model.bin`: the shared model for fold-in *in the browser*. An anonymous
  shopper's basket never leaves the page: it downloads the item tables once (float16, about 2 bytes
  per number) and runs `fedshop.models.fold_in` in JavaScript (static/foldin.js). The manifest (JSON:
  item ids, names, prices, where each table lies in the binary) revalidates by ETag; the binary's URL
  carries its content hash, so the browser keeps it for good.
  It also carries, for each storefront *this process serves* (all, or the one of `--silo`), that
  storefront's private `silo_item_bias` row: its local taste, which the page adds to the scores as
  the server does. Another storefront's row is never loaded, so never sent.
- `GET /api/runs`, `GET /api/runs/{name}`: the operator view, over the run folders in `runs_root`
  (read only: metrics.json, data_report.json, config.toml, insight.json, and the privacy ledger).
- `GET /api/insight`: the served run's cross-border insight (insight.json), or 404 saying how to make it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import threading
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from fedshop.models.fold_in import FoldInSettings, settings_for
from fedshop.serve.model import NotFoundError, ServingModel

STATIC = Path(__file__).with_name("static")
BUNDLE_FORMAT = 1
METHODS = ("federated", "centralized", "local_only", "popularity")
INSIGHT = "insight.json"
# The page's files change with the package: the browser asks again each time (a 304 when unchanged).
REVALIDATE = {"Cache-Control": "no-cache"}
# The binary's URL names its content, so it never changes: the browser keeps it.
IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}


# ---- the model bundle for the browser -----------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """What `/api/model` serves: a JSON manifest and one binary holding every table."""

    manifest: dict[str, Any]
    data: bytes
    etag: str
    version: str  # the binary's content hash, in its URL


def _align(buffer: bytearray, to: int = 8) -> None:
    buffer.extend(b"\0" * (-len(buffer) % to))


def _table(buffer: bytearray, value: torch.Tensor, dtype: str) -> dict[str, Any]:
    """Append `value` (little-endian) and say where it lies; float32 where float16 cannot hold it."""
    array = value.detach().cpu().float().numpy()
    if dtype == "float16" and np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
        dtype = "float32"
    array = array.astype("<f2" if dtype == "float16" else "<f4")
    _align(buffer)
    entry = {"dtype": dtype, "shape": list(array.shape), "offset": len(buffer)}
    buffer.extend(array.tobytes())
    return entry


def model_bundle(
    spec_name: str,
    item_tables: dict[str, torch.Tensor],
    dense: dict[str, torch.Tensor],
    item_ids: list[str],
    names: list[str],
    prices: list[float | None],
    silos: list[tuple[str, str, torch.Tensor | None]],
    settings: FoldInSettings,
    run: str,
) -> Bundle:
    """Item tables and silo offsets as float16 (they are most of the bytes), dense weights as float32
    (a few hundred numbers that every score goes through)."""
    buffer = bytearray()
    tables = {name: _table(buffer, value, "float16") for name, value in item_tables.items()}
    weights = {name: _table(buffer, value, "float32") for name, value in dense.items()}
    served = [
        {
            "name": name,
            "slug": slug,
            "item_bias": None if bias is None else _table(buffer, bias.reshape(-1), "float16"),
        }
        for name, slug, bias in silos
    ]
    data = bytes(buffer)
    digest = hashlib.sha256(data).hexdigest()[:20]
    manifest = {
        "format": BUNDLE_FORMAT,
        "run": run,
        "model": spec_name,
        "n_items": len(item_ids),
        "fold_in": asdict(settings),
        "items": {"ids": item_ids, "names": names, "prices": prices},
        "tables": tables,
        "dense": weights,
        "silos": served,
        "data": {"url": f"/api/model.bin?v={digest}", "bytes": len(data)},
    }
    text = json.dumps(manifest, sort_keys=True).encode()
    etag = '"' + hashlib.sha256(text + data).hexdigest()[:32] + '"'
    return Bundle(manifest, data, etag, digest)


def bundle_of(model: ServingModel) -> Bundle:
    spec, shared, catalogue = model.spec, model.shared, model.catalogue
    prices = [None if math.isnan(p) else round(float(p), 4) for p in catalogue.prices]
    return model_bundle(
        spec.name,
        {name: shared[name] for name in spec.item_tables},
        spec.dense_of(shared),
        [str(i) for i in catalogue.item_ids],
        [str(n) for n in catalogue.names],
        prices,
        [(s.name, s.slug, s.item_offsets) for s in model.storefronts.values()],
        settings_for(model.spec),
        model.run_dir.resolve().name,
    )


def decode_bundle(bundle: Bundle) -> dict[str, Any]:
    """The tables as the browser sees them (float16-rounded), as float32 tensors: what the tests
    and anyone checking the page's maths compare against."""

    def read(entry: dict[str, Any]) -> torch.Tensor:
        dtype = np.dtype("<f2" if entry["dtype"] == "float16" else "<f4")
        count = int(np.prod(entry["shape"])) if entry["shape"] else 1
        array = np.frombuffer(bundle.data, dtype, count, entry["offset"]).astype(np.float32)
        return torch.from_numpy(array.reshape(entry["shape"]))

    manifest = bundle.manifest
    shared = {name: read(e) for name, e in {**manifest["tables"], **manifest["dense"]}.items()}
    offsets = {
        s["name"]: None if s["item_bias"] is None else read(s["item_bias"])
        for s in manifest["silos"]
    }
    return {"shared": shared, "offsets": offsets}


# ---- the runs folder (operator view) ------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read {path.name}: {' '.join(str(exc).split())}"}


def run_folder(runs_root: Path, name: str) -> Path:
    """The run folder `name`, a direct child of `runs_root`; 404 for anything else (`..`, a path,
    a symlink that leads out of the folder, a folder that is not a run)."""
    missing = NotFoundError(f"no run '{name}' in the runs folder")
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise missing
    root = runs_root.resolve()
    try:
        path = (root / name).resolve(strict=True)
    except (OSError, RuntimeError):
        raise missing from None
    if path.parent != root or not path.is_dir() or not (path / "metrics.json").is_file():
        raise missing
    return path


def run_summary(path: Path, served: Path) -> dict[str, Any]:
    """One row of the runs list."""
    metrics = _read_json(path / "metrics.json")
    stamp = dt.datetime.fromtimestamp((path / "metrics.json").stat().st_mtime, dt.UTC)
    row: dict[str, Any] = {
        "name": path.name,
        "date": stamp.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "served": path == served,
        "incomplete": (path / "INCOMPLETE").exists(),
        "has_insight": (path / INSIGHT).is_file(),
    }
    if not isinstance(metrics, dict) or "error" in metrics:
        return {**row, "error": (metrics or {}).get("error", "no metrics.json")}
    privacy = metrics.get("privacy") or {}
    return {
        **row,
        "dataset": metrics.get("dataset"),
        "mode": metrics.get("mode"),
        "model": metrics.get("model"),
        "rounds": metrics.get("rounds"),
        "hr_at_10": {
            m: metrics[m].get("hr@10") for m in METHODS if isinstance(metrics.get(m), dict)
        },
        "epsilon": privacy.get("epsilon"),
        "has_cold_start": "cold_start" in metrics,
    }


def list_runs(runs_root: Path, served: Path) -> list[dict[str, Any]]:
    root = runs_root.resolve()
    if not root.is_dir():
        return []
    rows = []
    for child in sorted(root.iterdir()):
        try:
            path = child.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if path.parent == root and path.is_dir() and (path / "metrics.json").is_file():
            rows.append(run_summary(path, served))
    return sorted(rows, key=lambda r: r["date"], reverse=True)


def ledger_block(path: Path, metrics: dict[str, Any], silos: list[str]) -> dict[str, Any]:
    """Each silo's ε spent on this run's dataset, by every run, from the privacy ledger the run
    used (its config's ledger_url, else the default). Read only: a ledger that does not exist is
    reported, never created."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from fedshop.storage.ledger import Ledger, LedgerError, default_url

    try:
        config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    configured = (config.get("privacy") or {}).get("ledger_url") or None
    url = default_url(configured)
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: say so without echoing it
        return {"available": False, "message": "the run's ledger_url is not a database URL"}
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return {"available": False, "url": shown, "message": f"no ledger at {shown}"}
    dataset = metrics.get("dataset") or ""
    try:
        ledger = Ledger(url)
        balances = [ledger.balance(silo, dataset) for silo in silos]
    except LedgerError as exc:
        return {"available": False, "url": shown, "message": str(exc)}
    except SQLAlchemyError as exc:  # a database that went away after opening
        message = " ".join(str(exc).split()[:30])
        return {"available": False, "url": shown, "message": f"cannot read the ledger: {message}"}
    return {
        "available": True,
        "url": shown,
        "dataset": dataset,
        "silos": [
            {
                "silo": b.silo,
                "spent_epsilon": b.spent_epsilon,
                "spent_delta": b.spent_delta,
                "budget_epsilon": b.budget_epsilon,
                "budget_delta": b.budget_delta,
                "runs": b.runs,
            }
            for b in balances
        ],
    }


def insight_hint(path: Path) -> str:
    return f"not computed for this run: run `fedshop insight {path}`"


def run_detail(path: Path, served: Path) -> dict[str, Any]:
    metrics = _read_json(path / "metrics.json")
    if not isinstance(metrics, dict) or "error" in metrics:
        raise NotFoundError(f"run '{path.name}' has no readable metrics.json")
    report = _read_json(path / "data_report.json") or {}
    silos = list(metrics.get("per_silo") or {})
    privacy = metrics.get("privacy") or {}
    insight = _read_json(path / INSIGHT)
    return {
        **run_summary(path, served),
        "methods": {m: metrics[m] for m in METHODS if isinstance(metrics.get(m), dict)},
        "settings": {
            key: metrics.get(key)
            for key in ("fedshop_version", "protocol", "split", "seed", "rounds")
        },
        "history": metrics.get("history") or [],
        "curves": metrics.get("curves") or {},
        "per_silo": metrics.get("per_silo") or {},
        "privacy": privacy,
        "protection": metrics.get("protection") or {},
        "ledger": ledger_block(path, metrics, silos),
        "data_report": report,
        "cold_start": metrics.get("cold_start"),
        "insight": insight,
        "insight_hint": None if insight is not None else insight_hint(path),
    }


# ---- routes -----------------------------------------------------------------------------------------


def _not_modified(request: Request, etag: str) -> bool:
    return etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]


def add_web_routes(app: FastAPI, model: ServingModel, runs_root: Path | None) -> None:
    served = model.run_dir.resolve()
    root = Path(runs_root).expanduser() if runs_root is not None else served.parent
    built: list[tuple[Bundle, bytes]] = []
    lock = threading.Lock()

    def bundle() -> tuple[Bundle, bytes]:
        """Built on first use, once (not at start-up: a server whose page nobody opens, such as a
        benchmark's over a million items, never pays for it)."""
        with lock:
            if not built:
                made = bundle_of(model)
                built.append((made, json.dumps(made.manifest).encode()))
            return built[0]

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=REVALIDATE)

    @app.get("/api/model")
    def model_manifest(request: Request) -> Response:
        """The shared model for the page's in-browser fold-in: the manifest (items, table layout,
        fold-in settings) with the URL of the binary."""
        made, body = bundle()
        headers = {**REVALIDATE, "ETag": made.etag}
        if _not_modified(request, made.etag):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @app.get("/api/model.bin")
    def model_data(request: Request, v: str = "") -> Response:
        """The tables the manifest describes, one little-endian buffer. Only under the URL the
        manifest gives (browsers keep it for good under that URL: another model's tables must not
        answer it)."""
        made, _ = bundle()
        if v != made.version:
            raise NotFoundError(f"no model tables of version '{v}' here: read /api/model again")
        headers = {**IMMUTABLE, "ETag": made.etag}
        if _not_modified(request, made.etag):
            return Response(status_code=304, headers=headers)
        return Response(made.data, media_type="application/octet-stream", headers=headers)

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"root": str(root), "runs": list_runs(root, served)}

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        return run_detail(run_folder(root, name), served)

    @app.get("/api/insight")
    def insight() -> JSONResponse:
        document = _read_json(served / INSIGHT)
        if document is None:
            raise NotFoundError(insight_hint(served))
        return JSONResponse(document)

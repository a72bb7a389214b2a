"""The shopping guide's HTTP API over a loaded run (`ServingModel`), as FastAPI routes.

Every answer is JSON. Every error is a status code and `{"error": {"status": …, "message": …}}`;
user input never gets a 500 or a traceback: unknown customer, item or storefront 404, a customer or
storefront this server does not serve 403, a value out of range or malformed JSON 422. Anything else
is logged here and answered with a 500 that says no more.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedshop.serve.model import RequestError, ServingModel

log = logging.getLogger("fedshop.serve")


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# An item id as the catalogue writes it; a number (a MovieLens id) is taken as its text.
ItemId = Annotated[str, BeforeValidator(_number_as_text)]

# What a request body must look like, for the message that refuses one that is not an object.
BASKET_EXAMPLE = '{"basket": ["85123A", "22423"], "k": 10}'


class BasketRequest(BaseModel):
    """POST /recommend: an anonymous shopper's basket (item ids), how many items, and optionally
    the storefront they shop at."""

    model_config = ConfigDict(extra="forbid")

    basket: list[ItemId] = Field(min_length=1, max_length=1000)
    k: int = 10
    silo: str | None = None


def error_body(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    """One line naming each bad field: `k: Input should be a valid integer`."""
    parts = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}")
            continue
        where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "body"
        if where == "body" and error.get("type") in ("model_attributes_type", "dict_type"):
            parts.append(
                f"the body must be a JSON object such as {BASKET_EXAMPLE} "
                "(sent as Content-Type: application/json)"
            )
            continue
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every error as `{"error": {status, message}}`, never a traceback (both services use it)."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_body(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_body(422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths (404), wrong methods (405): the same error shape as the rest.
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_body(exc.status_code, message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return error_body(500, "internal error (logged by the server)")


def service_app(model: Any, title: str, summary: str) -> FastAPI:
    """An app over a served run (`ServingModel` or the fit service's model): the error shape,
    `GET /health` and `GET /silos`; each service adds its own routes."""
    app = FastAPI(title=title, summary=summary, docs_url="/docs", redoc_url=None)
    app.state.model = model
    install_error_handlers(app)

    # Plain `def` routes: scoring is CPU work, which FastAPI runs in its thread pool, so one slow
    # request does not hold up the event loop.
    @app.get("/health")
    def health() -> dict[str, Any]:
        return model.health()

    @app.get("/silos")
    def silos() -> dict[str, Any]:
        return model.silos()

    return app


def create_app(model: ServingModel, runs_root: Path | None = None) -> FastAPI:
    """The API over `model`; `runs_root` is the folder of runs the operator view lists."""
    app = service_app(
        model, "FedShop shopping guide", f"Recommendations from run {model.run_dir.name}"
    )
    app.state.runs_root = runs_root

    @app.get("/customers")
    def customers(silo: str | None = None, limit: int = 50) -> dict[str, Any]:
        return model.customers(silo, limit)

    @app.get("/recommend")
    def recommend(customer: str, k: int = 10) -> dict[str, Any]:
        return model.recommend(customer, k)

    @app.post("/recommend")
    def recommend_basket(request: BasketRequest) -> dict[str, Any]:
        return model.recommend_basket([str(i) for i in request.basket], request.k, request.silo)

    @app.get("/similar")
    def similar(item: str, k: int = 10) -> dict[str, Any]:
        return model.similar(item, k)

    @app.get("/items")
    def items(q: str = "", limit: int = 20) -> dict[str, Any]:
        return model.search(q, limit)

    from fedshop.serve.web import add_web_routes

    add_web_routes(app, model, runs_root)
    return app

"""The web page served by the same app (placeholder: the page itself replaces this module)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from fedshop.serve.model import ServingModel


def add_web_routes(app: FastAPI, model: ServingModel, runs_root: Path | None) -> None:
    """`GET /`: the page."""

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (
            "<!doctype html><title>FedShop</title>"
            f"<h1>FedShop shopping guide</h1><p>Run {escape(model.run_dir.name)}: "
            '<a href="/health">/health</a>, <a href="/docs">API</a></p>'
        )

"""Screenshot of the shopping guide's shopper view, for the README (docs/shopping-guide.png).

    python scripts/page_screenshot.py RUN_DIR [--out docs/shopping-guide.png] [--silo NAME]
        [--search heart --search lantern ...]

Serves RUN_DIR (every storefront, as `fedshop serve` does) on a free port of 127.0.0.1, opens the page
in Debian's chromium through Playwright, picks the storefront, builds a basket by searching the
catalogue (adding the first hit of each search) and saves the viewport as an 8-bit palette PNG.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "shopping-guide.png")
    parser.add_argument("--silo", default="United Kingdom")
    parser.add_argument("--search", action="append", default=None)
    args = parser.parse_args()
    searches = args.search or ["heart", "lantern", "cake"]

    import uvicorn
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from fedshop.serve.app import create_app
    from fedshop.serve.model import ServingModel

    chromium = shutil.which("chromium")
    if chromium is None:
        print("error: chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    model = ServingModel.load(args.run_dir)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    server = uvicorn.Server(uvicorn.Config(create_app(model), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--no-sandbox"] if os.geteuid() == 0 else []
            )
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url)
            page.wait_for_selector("body[data-ready='true']", state="attached")
            page.wait_for_selector("#model-status[data-ready='true']", state="attached")
            page.select_option("#storefront", args.silo)
            for count, words in enumerate(searches, start=1):
                page.fill("#search", words)
                page.wait_for_selector(f"#search-results[data-query='{words}'] li button.add")
                page.click("#search-results li button.add")
                page.wait_for_selector(f"#recommendations[data-basket='{count}'] li")
            page.fill("#search", searches[-1])
            png = page.screenshot()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's screenshot: a tab as a visitor lands on it, its first example's run shown from the shipped
store, in Debian's Chromium driven by Playwright.

    python -m benchmarks.screenshot                       # the vocabulary tab -> assets/screenshot.png
    python -m benchmarks.screenshot --tab text --out /tmp/text.png
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

import app
from benchmarks.common import ROOT
from doodl.capabilities import CAPABILITIES
from doodl.serving import Serving

WAIT = 60_000  # ms: everything shown comes from the store


def screenshot(url: str, tab: str, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url, wait_until="load")  # gradio keeps a connection open: never "networkidle"
        page.get_by_role("tab", name=CAPABILITIES[tab].title).click()
        panel = page.get_by_role("tabpanel").filter(visible=True)
        expect(panel.get_by_text("Done: iteration").first).to_be_visible(timeout=WAIT)
        expect(panel.get_by_text("DOODL, iteration").first).to_be_visible(timeout=WAIT)
        page.wait_for_timeout(2_000)  # the loss curve and images finish drawing
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tab", default="vocabulary", choices=list(CAPABILITIES))
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot.png")
    args = p.parse_args()
    demo = app.build_app(Serving())
    _, url, _ = app.launch(demo, port=None, block=False)
    try:
        screenshot(url, args.tab, args.out)
    finally:
        demo.close()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

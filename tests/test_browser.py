"""The app as a browser renders it: headless Chromium loads the page, the DOM and a screenshot are checked.

Needs Debian's `chromium` (scripts/test.sh installs it); skipped when it is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import app
from tests.test_app import prepare_models, serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)

TABS = ("Text guidance", "Vocabulary expansion", "Personalization", "Aesthetic improvement")

# Headless, offline and quiet; the virtual-time budget lets the page's scripts finish before the dump.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    demo, url = serve(app.Serving(prepare_models(tmp_path_factory.mktemp("models"))))
    yield url
    demo.close()


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_page_shows_the_four_tabs(url, tmp_path):
    dom = chromium(tmp_path / "profile", "--dump-dom", url).stdout
    for tab in TABS:
        assert tab in dom, f"tab {tab!r} is not in the rendered page"
    # A visitor is told what the embedded model can draw.
    assert "six colors" in dom and "64 x 64 pixels" in dom


def test_a_visitor_lands_on_the_first_examples_results(url, tmp_path):
    """The examples' outputs are cached: the first one's side-by-side is on the page before any click."""
    dom = chromium(tmp_path / "profile", "--dump-dom", url).stdout
    for shown in ("Done: iteration", "Unguided", "One-step guidance, scale", "DOODL, iteration"):
        assert shown in dom, f"{shown!r} is not on the page on arrival"
    screenshot = tmp_path / "arrival.png"
    chromium(tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,1400", url)
    assert screenshot.stat().st_size > 50_000  # the images are there, not only the layout


def test_screenshot(url, tmp_path):
    screenshot = tmp_path / "app.png"
    chromium(tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,1000", url)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert screenshot.stat().st_size > 10_000  # a blank page compresses to far less

"""The page as a visitor uses it, in Debian's Chromium driven by Playwright: every tab opens, every example
shows its run (side by side and loss curve), a live run streams its progress, and Stop keeps the best image
so far. Any error the page raises or logs fails the test.

Needs Debian's `chromium` (`.ci/run` installs it). Without it the tests are skipped on a developer's machine,
and fail under CI, where a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator

import pytest
import torch

from doodl.flow import FLOW_MIX
from doodl.serving import EMBEDDED, Serving
from doodl.showcase import Showcase
from tests.test_app import prepare_models, serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("the browser tests need Debian's chromium (apt-get install chromium)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)

playwright = pytest.importorskip("playwright.sync_api")

TABS = {
    "text": "Text guidance",
    "vocabulary": "Vocabulary expansion",
    "personalization": "Personalization",
    "aesthetic": "Aesthetic improvement",
}
CAPTIONS = ("Unguided", "One-step guidance, scale", "DOODL, iteration")
WAIT = 60_000  # ms for anything the page shows from the cache
RUN_WAIT = 240_000  # ms for a live run of a few steps on a busy 2-core machine


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: more threads only synchronize
    demo, url = serve(Serving(prepare_models(tmp_path_factory.mktemp("models"))))
    yield url
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url) -> Iterator:
    """A fresh visit; the test fails if the page raised or logged any error meanwhile."""
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and errors.append(f"console: {message.text}"))
    page.goto(url, wait_until="load")  # gradio keeps a connection open: never "networkidle"
    page.get_by_role("tab", name=TABS["text"]).wait_for(timeout=WAIT)
    yield page
    page.close()
    assert not errors, errors


def open_tab(page, tab: str):
    """Click a tab as a visitor does; return its panel once shown."""
    button = page.get_by_role("tab", name=TABS[tab])
    button.click()
    playwright.expect(button).to_have_attribute("aria-selected", "true", timeout=WAIT)
    panel = page.get_by_role("tabpanel").filter(visible=True)
    playwright.expect(panel).to_have_count(1)
    playwright.expect(panel.locator(f"#{tab}-examples")).to_be_visible()
    return panel


def expect_run_shown(panel, done: str = "Done: iteration") -> None:
    """The side by side with its captions, every iteration's image, a drawn loss curve, and the status line
    of a finished run."""
    playwright.expect(panel.get_by_text(done).first).to_be_visible(timeout=RUN_WAIT)
    gallery = panel.locator(".gallery-container, [data-testid='gallery']").first
    for caption in CAPTIONS:
        playwright.expect(panel.get_by_text(caption).first).to_be_visible(timeout=WAIT)
    playwright.expect(gallery.locator("img").first).to_be_visible(timeout=WAIT)
    # Every iteration's image, the first the unguided start, each captioned with its loss.
    playwright.expect(panel.locator(".iterations img").first).to_be_visible(timeout=WAIT)
    playwright.expect(panel.locator(".iterations").get_by_text("1: loss").first).to_be_attached(timeout=WAIT)
    plot = panel.locator(".vega-embed").first
    playwright.expect(plot).to_be_visible(timeout=WAIT)
    playwright.expect(plot.locator("canvas, svg").first).to_be_visible(timeout=WAIT)


def example_rows(panel):
    return panel.locator("[id$='-examples'] .tr-body, [id$='-examples'] .gallery-item")


def test_a_visitor_lands_on_the_first_examples_run_and_every_tab_opens(page, tmp_path):
    expect_run_shown(page.get_by_role("tabpanel").filter(visible=True))
    for tab in TABS:
        panel = open_tab(page, tab)
        expect_run_shown(panel)  # the first example's results are preloaded on every tab
        page.screenshot(path=str(tmp_path / f"{tab}.png"), full_page=True)
        assert (tmp_path / f"{tab}.png").stat().st_size > 50_000  # images drawn, not only the layout


def shown_run(panel) -> tuple[str, str | None]:
    """The status line and the first side-by-side image of the run a panel shows."""
    status = panel.get_by_text("Done: iteration").first.inner_text()
    image = panel.locator("[data-testid='gallery'] img, .gallery-container img").first.get_attribute("src")
    return status, image


def wait_for_another_run(page, panel, before: tuple[str, str | None]) -> tuple[str, str | None]:
    """The run shown once it is no longer `before`: a click replaces the side by side a moment later."""
    for _ in range(WAIT // 250):
        with contextlib.suppress(playwright.Error):  # the gallery may be mid-replacement
            now = shown_run(panel)
            if now != before:
                return now
        page.wait_for_timeout(250)
    raise AssertionError(f"the page still shows {before}")


@pytest.mark.parametrize("tab", TABS)
def test_every_example_shows_its_run(page, tab):
    panel = open_tab(page, tab)
    rows = example_rows(panel)
    assert rows.count() == len(Showcase.of(Serving()).rows(tab))  # the UNet's, then the flow's
    expect_run_shown(panel)
    first = shown_run(panel)  # on arrival, the first example's run
    shown = [first]
    for index in range(1, rows.count()):
        rows.nth(index).click()
        shown.append(wait_for_another_run(page, panel, shown[-1]))
        expect_run_shown(panel)
    assert len(set(shown)) == rows.count(), "two examples showed the same run"
    if rows.count() > 1:
        rows.nth(0).click()  # and back to the first
        playwright.expect(panel.get_by_text(first[0]).first).to_be_visible(timeout=WAIT)


def settings(panel, steps: int, iterations: int, opened: bool = False) -> None:
    """Open the settings (unless `opened`) and type the steps and iterations, until the page holds them: on
    a busy machine a field filled before the accordion's content has settled was reset to its default."""
    if not opened:
        panel.get_by_text("Settings").first.click()
    fields = {"Sampling steps": str(steps), "Optimization iterations": str(iterations)}
    for _ in range(5):
        for label, value in fields.items():
            field = panel.get_by_label(label)
            playwright.expect(field).to_be_visible(timeout=WAIT)
            field.fill(value)
            field.press("Tab")
        panel.page.wait_for_timeout(500)
        if all(panel.get_by_label(label).input_value() == value for label, value in fields.items()):
            return
    raise AssertionError(f"the settings did not take {fields}")


def test_a_live_run_shows_its_progress_and_result(page):
    panel = open_tab(page, "text")
    panel.get_by_label("Prompt").fill("a yellow star")
    settings(panel, steps=2, iterations=2)
    panel.get_by_role("button", name="Run", exact=True).click()
    expect_run_shown(panel, done="Done: iteration 2 of 2")


def test_stop_ends_a_run_and_keeps_the_best_image(page):
    panel = open_tab(page, "text")
    settings(panel, steps=2, iterations=1000)
    panel.get_by_role("button", name="Run", exact=True).click()
    # Iterations of 2 steps can pass faster than the page is polled: any iteration from the third on.
    third_or_later = re.compile(r"Iteration ([3-9]|\d\d+) of 1000:")
    playwright.expect(panel.get_by_text(third_or_later).first).to_be_visible(timeout=RUN_WAIT)
    panel.get_by_role("button", name="Stop", exact=True).click()
    status = panel.get_by_text("of 1000:").first
    page.wait_for_timeout(2_000)  # an update already on its way when Stop was clicked may still arrive
    stopped = status.inner_text()
    page.wait_for_timeout(3_000)
    assert status.inner_text() == stopped, "the run went on after Stop"
    best = panel.locator(".best img")
    playwright.expect(best).to_be_visible()
    assert best.get_attribute("src")


def test_a_flow_example_chooses_the_flow_generator_and_its_settings(page):
    """The flow transformer's examples are listed after the UNet's; a click on one sets the Generator, its
    settings follow, and its stored run is shown."""
    showcase = Showcase.of(Serving())
    tab = next(
        name for name in TABS if len(showcase.rows(name)) > len(showcase.servings[0].examples().rows[name])
    )
    panel = open_tab(page, tab)
    expect_run_shown(panel)
    before = shown_run(panel)
    rows = example_rows(panel)
    rows.nth(rows.count() - 1).click()
    wait_for_another_run(page, panel, before)
    expect_run_shown(panel)
    playwright.expect(page.get_by_label("Generator")).to_have_value(f"{EMBEDDED}/flow", timeout=WAIT)
    panel.get_by_text("Settings").first.click()
    mixing = panel.get_by_label("EDICT mixing weight p", exact=False).first
    playwright.expect(mixing).to_have_value(str(FLOW_MIX), timeout=WAIT)


def test_a_visitor_picks_the_flow_generator_and_its_settings_follow(page):
    """The embedded world drawn by SD3's transformer is one choice away; its own settings come with it."""
    generator = page.get_by_label("Generator")
    generator.click()
    page.get_by_role("option", name=f"{EMBEDDED}/flow").click()
    panel = open_tab(page, "text")
    panel.get_by_text("Settings").first.click()
    mixing = panel.get_by_label("EDICT mixing weight p", exact=False).first
    playwright.expect(mixing).to_have_value(str(FLOW_MIX), timeout=WAIT)
    panel.get_by_label("Prompt").fill("a red circle")
    settings(panel, steps=2, iterations=2, opened=True)
    panel.get_by_role("button", name="Run", exact=True).click()
    expect_run_shown(panel, done="Done: iteration 2 of 2")

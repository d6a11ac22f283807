"""Screenshots of every tab, and the time from app start to the first answer.

    python -m medvqa.app.screenshots assets/screenshots

Starts the app in this process, asks the first example through the `ask` API (timed from the
start of `build()`), then drives Debian's chromium headless through Playwright tab by tab.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

TABS = ("Ask & compare", "Features", "Fine-tune", "Review", "About")


def main(out: str = "assets/screenshots") -> dict:
    from gradio_client import Client, handle_file
    from playwright.sync_api import sync_playwright

    from medvqa.app import build
    from medvqa.app.common import examples

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    demo = build()
    demo.launch(server_name="127.0.0.1", server_port=7861, prevent_thread_lock=True, quiet=True)
    ex = examples()[0]
    r = Client("http://127.0.0.1:7861/", verbose=False).predict(handle_file(ex["path"]), ex["question"], ex["dataset"],
                                                                 api_name="/ask")
    timing = {"start_to_first_answer_s": round(time.time() - t0, 1), "models": sorted(r["models"])}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto("http://127.0.0.1:7861/")   # the first screen: the first example, answered on load
        _wait_for_images(page, len(r["models"]))   # every model's map, and its nearest cases
        page.screenshot(path=str(out_dir / "ask.png"), full_page=True)
        for tab in TABS[1:]:
            page.get_by_role("tab", name=tab).click()
            if tab == "Features":
                page.get_by_role("button", name="Show").click()
                page.wait_for_timeout(6000)
            if tab == "Review":
                page.get_by_label("Reviewer name").fill("demo")
                page.get_by_role("button", name="Load cases").click()
                page.wait_for_timeout(8000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out_dir / f"{tab.split()[0].lower().replace('-', '')}.png"), full_page=True)
        browser.close()
    demo.close()
    return timing


def _wait_for_images(page, maps: int, timeout_ms: int = 180_000):
    """Until `maps` saliency maps are shown and every map and nearest-case thumbnail has loaded: they
    arrive after the answers, and Gradio's images load lazily (below the fold, only once scrolled to,
    which a full-page screenshot does not do), so they are switched to eager first."""
    page.wait_for_function("n => document.querySelectorAll('.saliency img').length >= n", arg=maps, timeout=timeout_ms)
    page.locator("text=processing").first.wait_for(state="hidden", timeout=timeout_ms)
    deadline = time.time() + timeout_ms / 1000
    while True:   # the shown ones only: a gallery keeps hidden copies for its preview
        page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
        shown = page.locator(".saliency img:visible, .nearest img:visible").all()
        if all(img.evaluate("i => i.complete && i.naturalWidth > 0") for img in shown):
            break
        if time.time() > deadline:
            raise TimeoutError("the maps and nearest cases did not load")
        page.wait_for_timeout(1000)
    for y in range(0, page.evaluate("document.body.scrollHeight"), 800):   # as a visitor would: every part painted
        page.evaluate(f"window.scrollTo(0, {y})")
        page.wait_for_timeout(400)
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(1000)


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))

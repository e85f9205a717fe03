"""The README's screenshots, taken the way a person uses the pages: start the demo comparison
from the form on a running stack (`make dev`), watch it finish, read it, vote in the arena.

    python -m scripts.screenshots [--url http://127.0.0.1:8000] [--out docs] [--votes 12]

Needs Debian's Chromium at /usr/bin/chromium. Prints how long each step took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from scripts.browser import CHROMIUM, CHROMIUM_ARGS


def shoot(page: Page, path: Path, *, full: bool = True) -> None:
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), full_page=full)
    print(f"  wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--votes", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        desktop = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=args.url)
        page = desktop.new_page()
        page.set_default_timeout(600_000)
        page.goto("/")
        page.get_by_role("link", name="New comparison").first.click()
        shoot(page, args.out / "new-comparison.png", full=False)
        page.get_by_role("button", name="Start comparison").click()
        page.wait_for_url("**/ui/comparisons/*")
        comparison = page.url
        print(f"started {comparison} after {time.monotonic() - started:.1f}s")
        page.locator("#grid").wait_for()
        print(f"finished after {time.monotonic() - started:.1f}s")
        shoot(page, args.out / "comparison-summary.png", full=False)
        page.select_option("#g-baseline", index=1)
        page.select_option("#g-diff", "baseline")
        page.select_option("#g-show", "disagree-output")
        page.evaluate("document.getElementById('grid-section').scrollIntoView({block: 'start'})")
        shoot(page, args.out / "comparison-grid.png", full=False)

        page.goto(comparison + "/arena")
        for _ in range(args.votes):
            page.get_by_role("button", name="A is better").wait_for()
            page.wait_for_timeout(150)
            # A person reading the two answers: prefer the shorter, which this demo asks for.
            a = page.locator('#answer-a [data-role="output"]').inner_text()
            b = page.locator('#answer-b [data-role="output"]').inner_text()
            page.keyboard.press("a" if len(a) < len(b) else "b" if len(b) < len(a) else "t")
            page.locator("#arena-next").wait_for(state="visible")
            page.keyboard.press("n")
        page.get_by_role("button", name="A is better").wait_for()
        page.wait_for_timeout(500)
        shoot(page, args.out / "arena.png", full=False)
        page.goto("/ui")
        shoot(page, args.out / "comparisons.png", full=False)

        phone = browser.new_context(viewport={"width": 390, "height": 844}, base_url=args.url)
        small = phone.new_page()
        small.goto(comparison.replace(args.url, ""))
        small.evaluate("document.querySelector('#grid tbody tr').scrollIntoView({block: 'start'})")
        shoot(small, args.out / "comparison-phone.png", full=False)
        browser.close()
    print(f"done in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()

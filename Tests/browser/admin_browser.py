#!/usr/bin/env python3
"""The admin UI in a real browser (Debian's chromium through Playwright).

Run by AdminBrowserTests against an admin it started on a database it
filled: policy "p" with partitions "a" ... of gate "c". Checks what only a
browser shows: the page fetches nothing from another origin and logs no
script error; the theme and the auto-refresh choice persist in
localStorage, and a refresh keeps the scroll position; watching a partition
puts it in the address and in localStorage, and a bare address gets the
watched list back; signing in with the token and pressing an action
button acts, with its CSRF field.

Usage: admin_browser.py BASE_URL TOKEN [SCREENSHOT_DIR]
Exit status 0 when every check passed; the failed check is printed.
"""
import re
import sys
import time

from playwright.sync_api import sync_playwright

base, token = sys.argv[1], sys.argv[2]
shots = sys.argv[3] if len(sys.argv) > 3 else None


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 700})
    foreign, errors = [], []
    page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(base) else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    page.goto(base + "/")
    check(page.locator("a[href='/policies/p']").count() == 1, "the overview lists policy p")
    check(page.evaluate("document.documentElement.dataset.theme") == "auto", "the theme starts as auto")
    page.select_option("#theme", "dark")
    check(page.evaluate("document.documentElement.dataset.theme") == "dark", "choosing dark applies at once")
    if shots:
        page.screenshot(path=f"{shots}/overview-dark.png", full_page=True)
    page.reload()
    check(page.evaluate("document.documentElement.dataset.theme") == "dark", "the theme survives a reload (localStorage)")
    page.select_option("#theme", "light")

    # Watch a partition: it goes into the address and into localStorage.
    page.goto(base + "/policies/p")
    page.locator("button.watch[data-partition='b']").first.click()
    page.wait_for_load_state()
    check("watch=b" in page.url, "watching b puts it in the address")
    check(page.locator("section:has(h2:text('Watched partitions')) td.key").first.inner_text().strip() == "b",
          "the watched list shows b")
    check(page.locator("section:has(h2:text('Watched partitions')) button.watch.on").count() == 1, "its star is on")
    page.goto(base + "/policies/p")
    page.wait_for_url("**watch=b**")
    check("watch=b" in page.url, "a bare address gets the watched list back from localStorage")
    if shots:
        page.screenshot(path=f"{shots}/policy.png", full_page=True)
    page.locator("section:has(h2:text('Watched partitions')) button.watch").first.click()
    page.wait_for_load_state()
    check(re.search(r"[?&]watch=", page.url) is None and "nowatch=1" in page.url, "unwatching empties the list")
    check(page.locator("section:has(h2:text('Watched partitions')) td.key").count() == 0, "nothing is watched now")

    # Auto-refresh: off by default; 2 s reloads the page and keeps the scroll position.
    page.goto(base + "/policies/p")
    check(page.locator("#refresh").input_value() == "0", "auto-refresh is off by default")
    page.evaluate("window.scrollTo(0, 400)")
    stamp = page.locator("footer").inner_text()
    page.select_option("#refresh", "2")
    deadline = time.time() + 10
    while time.time() < deadline and page.locator("footer").inner_text() == stamp:
        time.sleep(0.2)
    check(page.locator("footer").inner_text() != stamp, "the page refreshed by itself")
    time.sleep(0.3)
    check(abs(page.evaluate("window.scrollY") - 400) < 5, "the refresh kept the scroll position")
    page.select_option("#refresh", "0")

    # Sign in, then pause the policy with the button.
    page.goto(base + "/login")
    page.fill("input[name=token]", token)
    page.click("form[action='/login'] button")
    page.wait_for_load_state()
    check(page.locator("text=Signed in").count() == 1, "signing in with the token works")
    page.goto(base + "/policies/p?nowatch=1")
    page.click("form[action='/actions/pause'] button")
    page.wait_for_load_state()
    check(page.locator("p.flash").inner_text().startswith("Paused p"), "the pause button pauses the policy")
    check(page.locator("h1 .state").inner_text() == "paused", "the page shows it paused")
    page.click("form[action='/actions/resume'] button")
    page.wait_for_load_state()
    check(page.locator("h1 .state").inner_text() == "active", "resume works the same way")

    check(not foreign, f"nothing was fetched from another origin ({foreign[:3]})")
    check(not errors, f"no script errors ({errors[:3]})")
    browser.close()
print("all browser checks passed")

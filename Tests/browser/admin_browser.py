#!/usr/bin/env python3
"""The admin UI in a real browser (Debian's chromium through Playwright).

Run by AdminBrowserTests against an admin on a database a short
`dispatch-policy demo` left behind (policies demo_webhooks and
demo_reports, completions, failures, jobs waiting). Checks what only a
browser shows: the pages fetch nothing from another origin and log no
script error; the charts render (bars and a lag line); the theme and the
auto-refresh choice persist in localStorage, and a refresh keeps the scroll
position; watching a partition puts it in the address and in localStorage,
and a bare address gets the watched list back; a job's page explains it;
signing in with the token and pressing an action button acts, with its
CSRF field. Screenshots of the overview, a policy page and a job's explain
go to SCREENSHOT_DIR (the README's come from here).

Usage: admin_browser.py BASE_URL TOKEN JOB_ID [SCREENSHOT_DIR]
Exit status 0 when every check passed; the failed check is printed.
"""
import re
import sys
import time

from playwright.sync_api import sync_playwright

base, token, job = sys.argv[1], sys.argv[2], sys.argv[3]
shots = sys.argv[4] if len(sys.argv) > 4 else None
policy = "demo_webhooks"


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

    # On a loaded machine the admin's first connection can be slow: a page
    # that says the database did not answer is retried for 30 s.
    page.goto(base + "/")
    deadline = time.time() + 30
    while page.locator(f"a[href='/policies/{policy}']").count() == 0 and time.time() < deadline:
        time.sleep(1)
        page.reload()
    check(page.locator(f"a[href='/policies/{policy}']").count() == 1,
          f"the overview lists {policy} (page: {page.locator('main').inner_text()[:300]!r})")
    check(page.locator("td svg.chart").count() >= 2, "a trend per policy")
    if shots:
        page.screenshot(path=f"{shots}/overview.png", full_page=True)
    check(page.evaluate("document.documentElement.dataset.theme") == "auto", "the theme starts as auto")
    page.select_option("#theme", "dark")
    check(page.evaluate("document.documentElement.dataset.theme") == "dark", "choosing dark applies at once")
    page.reload()
    check(page.evaluate("document.documentElement.dataset.theme") == "dark", "the theme survives a reload (localStorage)")
    page.select_option("#theme", "light")

    # The policy page: its chart has bars (completions) and a lag line.
    page.goto(base + f"/policies/{policy}")
    check(page.locator("section svg.chart rect.done").count() > 0, "the chart draws completions as bars")
    check(page.locator("section svg.chart path.lag").count() > 0, "and the average lag as a line")
    check(page.locator("section svg.chart title").count() > 0, "with a tooltip per minute")
    # Watch a partition: it goes into the address and into localStorage.
    star = page.locator("section:has(h2:text('Partitions')) button.watch").first
    key = star.get_attribute("data-partition")
    star.click()
    page.wait_for_load_state()
    check("watch=" in page.url, f"watching {key} puts it in the address")
    check(page.locator("section:has(h2:text('Watched partitions')) td.key").first.inner_text().strip() == key,
          f"the watched list shows {key}")
    check(page.locator("section:has(h2:text('Watched partitions')) button.watch.on").count() == 1, "its star is on")
    page.goto(base + f"/policies/{policy}")
    page.wait_for_url("**watch=**")
    check(key in page.locator("section:has(h2:text('Watched partitions')) td.key").first.inner_text(),
          "a bare address gets the watched list back from localStorage")
    if shots:
        page.screenshot(path=f"{shots}/policy.png", full_page=True)
    page.locator("section:has(h2:text('Watched partitions')) button.watch").first.click()
    page.wait_for_load_state()
    check(re.search(r"[?&]watch=", page.url) is None and "nowatch=1" in page.url, "unwatching empties the list")
    check(page.locator("section:has(h2:text('Watched partitions')) td.key").count() == 0, "nothing is watched now")

    # A job's page explains where it is.
    page.goto(base + f"/jobs/{job}")
    check(page.locator("h2:text('Why it is where it is')").count() == 1, "a job's page explains it")
    check(page.locator("table.grid tbody tr").count() > 0, "with rows")
    if shots:
        page.screenshot(path=f"{shots}/job.png", full_page=True)

    # Auto-refresh: off by default; 2 s reloads the page and keeps the scroll position.
    page.goto(base + f"/policies/{policy}?nowatch=1")
    check(page.locator("#refresh").input_value() == "0", "auto-refresh is off by default")
    page.evaluate("window.scrollTo(0, 400)")
    stamp = page.locator("footer").inner_text()
    page.select_option("#refresh", "2")
    deadline = time.time() + 10
    while time.time() < deadline and page.locator("footer").inner_text() == stamp:
        time.sleep(0.2)
    check(page.locator("footer").inner_text() != stamp, "the page refreshed by itself")
    # The reloaded page restores its scroll once loaded; a loaded machine may
    # take a while.
    deadline = time.time() + 10
    while time.time() < deadline and abs(page.evaluate("window.scrollY") - 400) >= 5:
        time.sleep(0.2)
    check(abs(page.evaluate("window.scrollY") - 400) < 5, "the refresh kept the scroll position")
    page.select_option("#refresh", "0")

    # Sign in, then pause the policy with the button.
    page.goto(base + "/login")
    page.fill("input[name=token]", token)
    page.click("form[action='/login'] button")
    page.wait_for_load_state()
    check(page.locator("text=Signed in").count() == 1, "signing in with the token works")
    page.goto(base + f"/policies/{policy}?nowatch=1")
    page.click("form[action='/actions/pause'] button")
    page.wait_for_load_state()
    check(page.locator("p.flash").inner_text().startswith(f"Paused {policy}"), "the pause button pauses the policy")
    check(page.locator("h1 .state").inner_text() == "paused", "the page shows it paused")
    page.click("form[action='/actions/resume'] button")
    page.wait_for_load_state()
    check(page.locator("h1 .state").inner_text() == "active", "resume works the same way")

    check(not foreign, f"nothing was fetched from another origin ({foreign[:3]})")
    check(not errors, f"no script errors ({errors[:3]})")
    browser.close()
print("all browser checks passed")

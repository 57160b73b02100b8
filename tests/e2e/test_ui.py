"""The web UI as a person uses it, in Debian's Chromium driven by Playwright (headless).

Against one `forgeline up` (local workspaces): log in with the admin key, submit through the
form, watch log lines arrive live, open the diff and collapse a file, copy the patch, rerun with
a follow-up prompt, cancel a `sleep 60` run, and see a bad submit's field errors. Each page is
saved as a 1280x800 PNG under tests/e2e/screenshots/ (kept as CI artifacts).

The browser is the system's /usr/bin/chromium (`apt-get install chromium`, done by
scripts/setup.sh); Playwright never downloads one. Without it the tests skip and say why.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.support import ADMIN_KEY, Instance, make_repo, submit, wait_request
from tests.helpers import wait_until

CHROMIUM = Path(os.environ.get("FORGELINE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).with_name("screenshots")
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def _skip_reason() -> str | None:
    if os.environ.get("FORGELINE_SKIP_BROWSER") == "1":
        return "FORGELINE_SKIP_BROWSER=1: no browser tests"
    if not CHROMIUM.exists():
        return (
            f"no Chromium at {CHROMIUM}: `apt-get install chromium` "
            "(scripts/setup.sh does it as root)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no playwright: pip install -e '.[test]'"
    return None


if _skip_reason() is None:
    from playwright.sync_api import expect, sync_playwright

ORIGINAL = {"README.md": "# sample\n", "greeting.txt": "hello\n"}

# Slow enough that the first lines show while the run is still going.
EDIT_SLOWLY = """\
for i in 1 2 3 4 5 6 7 8; do echo "tick $i"; sleep 0.5; done
echo "a warning on stderr" >&2
printf 'hello, world\\n' > greeting.txt
mkdir -p docs
printf 'written by the agent\\n' > docs/notes.md
echo "done"
"""
FOLLOW_UP = "printf 'and once more\\n' >> greeting.txt\necho 'follow-up ran'\n"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _skip_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":  # CI must run them: a skip there would hide a gap
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Session:
    """One browser tab on the instance, with what it saw (URLs asked for, page errors)."""

    def __init__(self, browser: Any, instance: Instance, viewport: dict[str, int]) -> None:
        self.instance = instance
        self.context = browser.new_context(viewport=viewport, base_url=instance.url)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=instance.url)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(m.text)
                if m.type == "error" and "Failed to load resource" not in m.text
                else None
            ),
        )

    def login(self, key: str = ADMIN_KEY) -> None:
        page = self.page
        page.goto("/")
        expect(page).to_have_url(re.compile(r"#/login$"))
        page.fill("#api-key", key)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#request-rows")).to_be_attached()

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))

    def close(self) -> None:
        assert not any(ADMIN_KEY in url for url in self.urls), "the API key went into a URL"
        assert not self.errors, f"errors in the page: {self.errors}"
        self.context.close()


@pytest.fixture
def tab(browser: Any, forgeline: Instance) -> Iterator[Session]:
    session = Session(browser, forgeline, LAPTOP)
    yield session
    session.close()


def submit_form(page: Any, repo: Path | str, prompt: str, **fields: str) -> None:
    page.goto("/#/submit")
    page.fill("#f-repo", str(repo))
    page.fill("#f-prompt", prompt)
    for name, value in fields.items():
        if name == "priority":
            page.select_option("#f-priority", value)
        else:
            page.fill(f"#f-{name}", value)
    page.click("#submit-button")


def request_id_of(page: Any) -> str:
    expect(page).to_have_url(re.compile(r"#/requests/[0-9a-f-]{36}$"))
    return str(page.url.rsplit("/", 1)[1])


# -- the tests ------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_without_a_key(forgeline: Instance) -> None:
    """No browser needed: what the gateway serves at / and /static/."""
    with httpx.Client(base_url=forgeline.url, timeout=10) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp
        assert '<meta name="viewport"' in page.text
        assert 'src="/static/app.js"' in page.text
        for name in ("app.js", "api.js", "diff.js", "dom.js"):
            asset = anonymous.get(f"/static/{name}")
            assert asset.status_code == 200, name
            assert "javascript" in asset.headers["content-type"], asset.headers
            # Nothing from another origin at run time (no CDN).
            assert not re.search(r"""(from|import)\s*\(?\s*["']https?:""", asset.text), name
        assert anonymous.get("/static/app.css").headers["content-type"].startswith("text/css")
        assert anonymous.get("/static/nothing-here.js").status_code == 404
        # The data stays behind the key.
        assert anonymous.get("/v1/whoami").status_code == 401
        assert anonymous.get("/v1/requests").status_code == 401


def test_login_refuses_a_wrong_key_and_accepts_the_admin_key(tab: Session) -> None:
    page = tab.page
    page.goto("/")
    expect(page).to_have_url(re.compile(r"#/login$"))
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("Enter an API key.")
    page.fill("#api-key", "fl_not_a_real_key")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("refused")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    tab.shot("login")
    page.fill("#api-key", ADMIN_KEY)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#queue-depth")).to_have_text(re.compile(r"^\d+\+?$"))
    expect(page.locator("#whoami")).to_contain_text("admin")
    assert page.evaluate("sessionStorage.getItem('forgeline.apiKey')") == ADMIN_KEY
    assert page.evaluate("localStorage.length") == 0, "the key must not outlive the tab"
    # Log out: the key is gone and the pages need a login again.
    page.click("#logout")
    expect(page).to_have_url(re.compile(r"#/login$"))
    assert page.evaluate("sessionStorage.getItem('forgeline.apiKey')") is None
    page.goto("/#/submit")
    expect(page).to_have_url(re.compile(r"#/login$"))


def test_submit_watch_logs_open_the_diff_copy_and_rerun(
    tab: Session, api: httpx.Client, tmp_path: Path
) -> None:
    page = tab.page
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    tab.login()
    submit_form(page, repo, EDIT_SLOWLY, priority="2", labels="suite=ui\nproject=web")
    request_id = request_id_of(page)

    # The log lines arrive while the run is still running (live, over SSE).
    logs = page.locator("#logs")
    expect(logs).to_contain_text("tick 1", timeout=30_000)
    assert "done" not in logs.inner_text(), "the first line must show before the run ends"
    expect(page.locator("#log-status")).to_have_text("live")
    expect(page.locator("#request-status")).to_contain_text(re.compile("running|provisioning"))
    expect(logs).to_contain_text("tick 3")
    logs.scroll_into_view_if_needed()
    tab.shot("request-live-logs")
    expect(page.locator("#log-status")).to_have_text("ended: succeeded", timeout=30_000)
    expect(logs.locator(".log-stderr")).to_contain_text("a warning on stderr")
    expect(page.locator("#request-status")).to_have_text("patch ready")
    expect(page.locator("#request-prompt")).to_have_text(EDIT_SLOWLY.rstrip("\n"))

    # The timeline: the request's events, in order.
    types = page.locator("#timeline li").evaluate_all("els => els.map(e => e.dataset.type)")
    wait_until(
        lambda: (
            "RunSucceeded"
            in page.locator("#timeline li").evaluate_all("els => els.map(e => e.dataset.type)")
        ),
        10,
        "the timeline to show RunSucceeded",
    )
    types = page.locator("#timeline li").evaluate_all("els => els.map(e => e.dataset.type)")
    assert types[0] == "RequestSubmitted", types
    for expected in ("RunQueued", "RunStarted", "PatchProduced", "RunSucceeded"):
        assert expected in types, types

    # The diff: one collapsible block per file, coloured lines.
    files = page.locator("#diff details.diff-file")
    expect(files).to_have_count(2)
    greeting = page.locator('#diff details[data-file="greeting.txt"]')
    expect(greeting.locator(".dl-add")).to_have_text("+hello, world")
    expect(greeting.locator(".dl-del")).to_have_text("-hello")
    expect(greeting.locator(".dl-hunk")).to_have_count(1)
    expect(greeting.locator(".dl-file")).to_contain_text("diff --git a/greeting.txt")
    greeting.locator("summary").click()
    expect(greeting).not_to_have_attribute("open", "")
    expect(greeting.locator("pre.diff-body")).to_be_hidden()
    notes = page.locator('#diff details[data-file="docs/notes.md"]')
    expect(notes.locator("pre.diff-body")).to_be_visible()
    page.locator("#diff").scroll_into_view_if_needed()
    tab.shot("request-diff")
    greeting.locator("summary").click()
    expect(greeting.locator("pre.diff-body")).to_be_visible()

    # Copy the patch: the clipboard holds exactly the API's patch.
    run_id = api.get(f"/v1/requests/{request_id}").json()["latest_run_id"]
    patch = api.get(f"/v1/runs/{run_id}/patch").text
    page.click("#copy-patch")
    expect(page.locator("#copy-patch")).to_have_text("Copied ✓")
    assert page.evaluate("navigator.clipboard.readText()") == patch

    # Rerun with a follow-up prompt: a second run, its logs, and the cumulative patch.
    page.fill("#followup-prompt", FOLLOW_UP)
    page.click("#rerun-button")
    expect(page.locator("#runs li")).to_have_count(2, timeout=30_000)
    expect(logs).to_contain_text("follow-up ran", timeout=30_000)
    expect(page.locator("#log-status")).to_have_text("ended: succeeded", timeout=30_000)
    expect(page.locator("#runs li.selected")).to_contain_text("#2")
    greeting = page.locator('#diff details[data-file="greeting.txt"]')
    expect(greeting.locator(".dl-add")).to_have_text(["+hello, world", "+and once more"])
    wait_until(
        lambda: (
            "RerunRequested"
            in page.locator("#timeline li").evaluate_all("els => els.map(e => e.dataset.type)")
        ),
        10,
        "the timeline to show RerunRequested",
    )
    view = api.get(f"/v1/requests/{request_id}").json()
    assert view["status"] == "patch_ready"
    assert view["labels"] == {"suite": "ui", "project": "web"}
    assert view["priority"] == 2
    assert len(view["runs"]) == 2
    page.locator("#rerun-button").scroll_into_view_if_needed()
    page.evaluate("window.scrollTo(0, 0)")
    tab.shot("request-rerun")


def test_cancel_a_sleeping_run(tab: Session, tmp_path: Path) -> None:
    page = tab.page
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    tab.login()
    submit_form(page, repo, "echo 'going to sleep'\nsleep 60\necho 'never printed'\n")
    request_id_of(page)
    expect(page.locator("#logs")).to_contain_text("going to sleep", timeout=30_000)
    expect(page.locator("#rerun-button")).to_be_disabled()
    expect(page.locator("#cancel-button")).to_be_enabled()
    page.click("#cancel-button")
    expect(page.locator("#request-status")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("#log-status")).to_have_text("ended: cancelled", timeout=30_000)
    expect(page.locator("#cancel-button")).to_be_disabled()
    expect(page.locator("#rerun-button")).to_be_enabled()
    expect(page.locator("#action-message")).to_have_text("The run was cancelled.")
    assert "never printed" not in page.locator("#logs").inner_text()
    tab.shot("request-cancelled")


def test_a_bad_submit_shows_the_errors_next_to_the_fields(
    tab: Session, forgeline: Instance
) -> None:
    page = tab.page
    tab.login()
    before = forgeline.event_count()
    # A label line that is not key=value is caught before anything is sent.
    submit_form(page, "/srv/repo", "echo hi", labels="no equals sign")
    expect(page.locator("#f-labels-error")).to_contain_text("is not key=value")
    # The server's 422: a relative repo, a blank prompt and a timeout out of range.
    page.fill("#f-labels", "")
    page.fill("#f-repo", "relative/path")
    page.fill("#f-prompt", "   ")
    page.fill("#f-timeout_s", "999999")
    page.click("#submit-button")
    expect(page.locator("#f-repo-error")).to_contain_text("repo must be a git URL")
    expect(page.locator("#f-prompt-error")).to_contain_text("must not be blank")
    expect(page.locator("#f-timeout_s-error")).to_contain_text("less than or equal to 86400")
    expect(page.locator("#f-ref-error")).to_be_empty()
    expect(page.locator("#form-error")).to_contain_text("invalid request")
    expect(page.locator("#f-repo")).to_have_attribute("aria-invalid", "true")
    expect(page).to_have_url(re.compile(r"#/submit$"))
    page.evaluate("window.scrollTo(0, 0)")
    tab.shot("submit-errors")
    assert forgeline.event_count() == before, "a refused submit records nothing"


def test_the_dashboard_lists_filters_pages_and_updates_live(
    browser: Any, tab: Session, api: httpx.Client, forgeline: Instance, tmp_path: Path
) -> None:
    page = tab.page
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    done = [submit(api, repo, f"echo {i} > n.txt", labels={"n": str(i)}) for i in range(3)]
    for accepted in done:
        wait_request(api, accepted["request_id"])
    tab.login()
    rows = page.locator("#request-rows tr")
    expect(rows.first).to_be_visible()

    # Live: a request submitted elsewhere shows up without a reload (the page polls every 2 s).
    fresh = submit(api, repo, "echo fresh > f.txt")
    expect(page.locator(f'#request-rows tr[data-id="{fresh["request_id"]}"]')).to_be_visible(
        timeout=10_000
    )
    wait_request(api, fresh["request_id"])
    # Newest first.
    expect(rows.first).to_have_attribute("data-id", fresh["request_id"])
    expect(rows.first).to_have_attribute("data-status", "patch_ready", timeout=10_000)

    # Queue depth: the count of queued requests.
    queued = len(api.get("/v1/requests", params={"status": "queued", "limit": 200}).json()["items"])
    expect(page.locator("#queue-depth")).to_have_text(str(queued))

    # Filter by status.
    page.select_option("#status-filter", "patch_ready")
    expect(page).to_have_url(re.compile(r"status=patch_ready$"))
    expect(rows.first).to_be_visible()
    wait_until(
        lambda: set(rows.evaluate_all("els => els.map(e => e.dataset.status)")) == {"patch_ready"},
        10,
        "only patch_ready rows",
    )
    tab.shot("dashboard")

    # Paging: 20 a page, newest first, no request on two pages.
    total = len(api.get("/v1/requests", params={"limit": 200}).json()["items"])
    page.select_option("#status-filter", "")
    expect(page).to_have_url(re.compile(r"#/$"))
    for i in range(max(0, 21 - total)):
        submit(api, repo, f"echo page {i} > p.txt")
    wait_until(
        lambda: len(api.get("/v1/requests", params={"limit": 200}).json()["items"]) > 20,
        30,
        "more than 20 requests",
    )
    expect(page.locator("#page-older")).to_be_enabled(timeout=10_000)
    first_page = rows.evaluate_all("els => els.map(e => e.dataset.id)")
    assert len(first_page) == 20
    page.click("#page-older")
    expect(page.locator("#page-newer")).to_be_enabled()
    wait_until(
        lambda: rows.evaluate_all("els => els.map(e => e.dataset.id)")[0] not in first_page,
        10,
        "the second page",
    )
    second_page = rows.evaluate_all("els => els.map(e => e.dataset.id)")
    assert not set(first_page) & set(second_page)
    page.click("#page-newer")
    expect(page.locator("#page-newer")).to_be_disabled()

    # Clicking a row's id opens its request page.
    page.locator(f'#request-rows tr[data-id="{fresh["request_id"]}"] a').click()
    expect(page).to_have_url(re.compile(fresh["request_id"]))
    expect(page.locator("#request-status")).to_have_text("patch ready")

    # The same pages on a phone: one column, no sideways scrolling.
    phone = Session(browser, forgeline, PHONE)
    try:
        phone.login()
        expect(phone.page.locator("#request-rows tr").first).to_be_visible()
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        phone.shot("dashboard-phone")
        phone.page.goto(f"/#/requests/{fresh['request_id']}")
        expect(phone.page.locator("#request-status")).to_have_text("patch ready")
        expect(phone.page.locator("#diff details.diff-file")).to_have_count(1)
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        phone.shot("request-phone")
    finally:
        phone.close()

"""The console's browser tests: Debian's chromium driven by Playwright (no browser is
downloaded: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD, ``executable_path``), against the service as it
runs (tests/service/conftest.py: the API and Celery workers as processes on PostgreSQL and
Redis). Every response the pages got is recorded (:class:`Browser`.responses) so that a test
can check what the API refused and what it answered. Screenshots go to the test's folder and,
with ``BLOCKVAULT_CONSOLE_SCREENSHOTS=<folder>`` (``make screenshots``), there too."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Response, sync_playwright

from tests.service.conftest import Stack, stack  # noqa: F401 - the fixture, for this folder's tests

CHROMIUM = "chromium"
# records the state of every API job panel the page shows (Running with its progress, then Succeeded)
JOB_WATCH = """
new MutationObserver(() => {
  window.__jobs = window.__jobs || {};
  window.__jobStates = window.__jobStates || [];
  for (const job of document.querySelectorAll('.job')) {
    const bar = job.querySelector('progress');
    window.__jobs[job.dataset.job] = job.dataset.state + ': ' + job.innerText;
    window.__jobStates.push(job.dataset.state + ':' + (bar ? bar.value : ''));
  }
}).observe(document, {subtree: true, childList: true, attributes: true});
"""


@dataclass
class Browser:
    page: Page
    base: str
    shots: list[Path]
    responses: list[Response] = field(default_factory=list)

    def go(self, route: str) -> None:
        self.page.goto(f"{self.base}/#/{route}")

    def shot(self, name: str) -> None:
        """A screenshot of the whole page, in the test's folder (and the screenshot folder)."""
        self.page.wait_for_timeout(300)  # the last frame painted
        for folder in self.shots:
            self.page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

    def refused(self) -> list[str]:
        """Every API call a page made that the API refused as unauthenticated or not allowed."""
        return [f"{r.status} {r.request.method} {r.url}" for r in self.responses if r.status in (401, 403, 404)]

    def bodies(self) -> str:
        """Everything the API answered the pages (JSON bodies), as one text."""
        return "\n".join(body for _url, body in self.answers())

    def answers(self) -> list[tuple[str, str]]:
        """Each API call the pages made and the JSON body it got: (method and URL, body)."""
        out = []
        for response in self.responses:
            if "/v1/" in response.url and response.status != 204:
                try:
                    out.append((f"{response.request.method} {response.url}", response.text()))
                except Exception:  # noqa: BLE001 - a body the browser dropped (a redirect, an abort)
                    continue
        return out

    def sign_in_with_key(self, key: str) -> None:
        self.page.goto(self.base + "/")
        self.page.get_by_role("tab", name="API key").click()
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_selector("#vm-table")

    def sign_in(self, account: str, password: str) -> None:
        self.page.goto(self.base + "/")
        self.page.get_by_label("Account name").fill(account)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Sign in").click()

    def dialog(self) -> Any:
        return self.page.locator("dialog[open]")

    def wait_jobs(self, done: int, timeout: float = 180) -> None:
        """Until ``done`` API jobs the page started ended Ready; fails at once on a failed one."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.page.evaluate("window.__jobs || {}")
            failed = [state for state in jobs.values() if state.startswith("Failed")]
            if failed:
                raise AssertionError(f"an API job failed: {failed}")
            if sum(state.startswith("Succeeded") for state in jobs.values()) >= done:
                return
            assert time.monotonic() < deadline, f"{done} jobs did not end in {timeout} s"
            self.page.wait_for_timeout(200)


@pytest.fixture
def browser(stack: Stack, tmp_path: Path) -> Iterator[Browser]:  # noqa: F811 - the imported fixture
    executable = shutil.which(CHROMIUM)
    if executable is None:
        pytest.fail("chromium is missing: run tests/harness/ensure-system", pytrace=False)
    shots = [tmp_path / "screenshots"]
    if os.environ.get("BLOCKVAULT_CONSOLE_SCREENSHOTS"):
        shots.append(Path(os.environ["BLOCKVAULT_CONSOLE_SCREENSHOTS"]))
    for folder in shots:
        folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 860})
            context.add_init_script(JOB_WATCH)
            page = context.new_page()
            page.set_default_timeout(30_000)
            found = Browser(page, f"http://127.0.0.1:{stack.port}", shots)
            page.on("response", lambda response: found.responses.append(response))  # noqa: PLW0108 - a bound builtin cannot take playwright's wrapper
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield found
            assert errors == [], errors  # no script error on any page
        finally:
            chromium.close()

"""Helpers for the report tests: read a Snakemake report's data, and drive headless Chromium.

Chromium is driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``:
the browser reads JSON commands from its fd 3 and writes replies and events to its fd 4,
each message ending with a NUL byte), so the tests need the browser and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1400,1000",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def report_data(report: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``results`` and ``categories`` objects embedded in a Snakemake HTML report."""
    text = report.read_text(encoding="utf-8")

    def variable(name: str) -> Any:
        match = re.search(
            rf'<script id="{name}">\s*var {name} = (.*?);\s*</script>', text, re.DOTALL
        )
        if match is None:
            raise AssertionError(f"no `var {name}` in {report}")
        return json.loads(match.group(1))

    return variable("results"), variable("categories")


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium process and one page in it, driven over the DevTools pipe."""

    def __init__(self, executable: str, profile_dir: Path, log_path: Path) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def connect_pipe_fds() -> None:  # runs in the child, before exec
            # copy above 4 first, so that neither dup2 overwrites the other's source
            read_end = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile_dir}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            close_fds=False,  # fds 3 and 4 must reach the browser (others are not inheritable)
            preexec_fn=connect_pipe_fds,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    # ---- protocol

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError("no answer from Chromium in time")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise DevToolsError("Chromium closed the DevTools pipe (did it crash?)")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(
        self, method: str, params: dict | None = None, *, page: bool = True, timeout: float = 60
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    # ---- page

    def open_page(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, page=False)
        attached = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, page=False
        )
        self.session = attached["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        reply = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout=timeout,
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"JavaScript error: {text}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise DevToolsError(f"timed out waiting for {expression}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(DevToolsError, OSError):
            self.call("Browser.close", page=False, timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self._log.close()


# Clicks, in the report app, each result of a category (its "eye" button), as a person
# would, and returns what the page then shows: for pictures, the <img> element once
# decoded, with its natural size.
SHOW_CATEGORY_JS = """
(async (category) => {
    const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
    async function until(find) {
        for (let i = 0; i < 200; i++) {
            const found = find();
            if (found) return found;
            await sleep(50);
        }
        throw new Error("timed out in category " + category);
    }
    const paths = Object.values(categories[category]).flat();
    const pathOfLabel = new Map(paths.map((p) => [Object.values(results[p].labels)[0], p]));
    // back to the menu first, as a person does: the results table keeps its rows while
    // it stays on screen, so going from one category straight to another would not work
    app.setView({navbarMode: "menu"});
    await until(() => document.querySelectorAll("tbody tr").length === 0);
    app.showCategory(category);
    const rows = await until(() => {
        const found = [...document.querySelectorAll("tbody tr")];
        return found.length === paths.length ? found : null;
    });
    const shown = [];
    for (const row of rows) {
        const label = row.querySelector("td").textContent.trim();
        const path = pathOfLabel.get(label);
        const entry = results[path];
        const item = {category, label, path, mime: entry.mime_type};
        if (entry.mime_type.startsWith("image/")) {
            row.querySelector("div[role=group] a").click();
            const img = await until(() =>
                [...document.images].find((i) => i.getAttribute("src") === entry.data_uri));
            await img.decode();
            Object.assign(item, {width: img.naturalWidth, height: img.naturalHeight});
        } else if (entry.mime_type === "text/html") {
            row.querySelector("div[role=group] a").click();
            const frame = await until(() =>
                [...document.querySelectorAll("iframe")].find(
                    (f) => f.getAttribute("src") === entry.data_uri));
            item.iframe = frame.getBoundingClientRect().height;
        }
        shown.push(item);
    }
    return shown;
})
"""


def show_category(browser: Chromium, category: str) -> list[dict[str, Any]]:
    return browser.evaluate(f"{SHOW_CATEGORY_JS}({json.dumps(category)})")


def show_result(browser: Chromium, category: str, label: str) -> None:
    """Show one result of a category, as its eye button does (for a screenshot)."""
    browser.evaluate(
        f"""(async () => {{
            app.setView({{navbarMode: "menu"}});
            await new Promise((resolve) => setTimeout(resolve, 300));
            app.showCategory({json.dumps(category)});
            await new Promise((resolve) => setTimeout(resolve, 300));
            const row = [...document.querySelectorAll("tbody tr")].find(
                (r) => r.querySelector("td").textContent.trim() === {json.dumps(label)});
            row.querySelector("div[role=group] a").click();
            await new Promise((resolve) => setTimeout(resolve, 500));
            await Promise.all([...document.images].map((i) => i.decode().catch(() => null)));
        }})()"""
    )

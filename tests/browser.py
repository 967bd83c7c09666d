"""A page opened in headless Chromium (DevTools protocol over a pipe), and what it rendered: title, headings, images,
table cells and the computed background colour of every element carrying a ``data-psi`` value (the report's heat
tables and their legend)."""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest


def chromium() -> str:
    """The browser; the test set-up installs Debian's chromium package when it is missing (CI machines start bare)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
            if subprocess.run(step, env=environment, capture_output=True, timeout=600).returncode != 0:
                break
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed (Debian: apt-get install -y chromium)")
    return found


def render(html_file: Path, profile: Path) -> dict:
    """Open the page in headless Chromium (DevTools protocol over a pipe) and read back what it rendered."""
    browser = chromium()
    # Chromium reads commands on fd 3 and answers on fd 4; the pipe ends are moved above 10 first so that the
    # shell's "3<&r 4>&w" cannot overwrite one of them with the other.
    to_browser, browser_in, browser_out, from_browser = (_high_fd(fd) for fd in (*os.pipe(), *os.pipe()))
    command = (f"exec {browser} --headless --no-sandbox --disable-gpu --no-first-run --remote-debugging-pipe "
               f"--user-data-dir={profile} about:blank 3<&{to_browser} 4>&{from_browser}")
    process = subprocess.Popen(["bash", "-c", command], pass_fds=(to_browser, from_browser),   # dash: 1-digit fds only
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_browser), os.close(from_browser)
    buffer, ids = b"", iter(range(1, 1000))

    def call(method: str, session: str | None = None, **params) -> dict:
        nonlocal buffer
        number = next(ids)
        os.write(browser_in, json.dumps({"id": number, "method": method, "params": params,
                                         **({"sessionId": session} if session else {})}).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if message.get("id") == number:
                    assert "error" not in message, message
                    return message["result"]
            assert time.monotonic() < deadline, f"no answer from chromium to {method}"
            if select.select([browser_out], [], [], 1.0)[0]:
                chunk = os.read(browser_out, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                buffer += chunk

    try:
        target = call("Target.createTarget", url=html_file.as_uri())["targetId"]
        session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        expression = ("location.protocol === 'file:' && document.readyState === 'complete' && "
                      "Array.from(document.images).every(i => i.complete) ? "
                      "JSON.stringify({title: document.title, headings: Array.from(document.querySelectorAll('h2'))"
                      ".map(h => h.textContent), images: Array.from(document.images).map(i => [i.naturalWidth, "
                      "i.naturalHeight, i.src.slice(0, 22)]), cells: Array.from(document.querySelectorAll('td'))"
                      ".map(td => td.textContent), colours: Array.from(document.querySelectorAll('[data-psi]'))"
                      ".map(e => [Number(e.dataset.psi), getComputedStyle(e).backgroundColor, "
                      "e.closest('table').className])}) : ''")
        deadline = time.monotonic() + 60
        while not (value := call("Runtime.evaluate", session, expression=expression)["result"].get("value")):
            assert time.monotonic() < deadline, "the report did not finish loading in chromium"
            time.sleep(0.2)
        call("Browser.close")
        return json.loads(value)
    finally:
        os.close(browser_in), os.close(browser_out)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high

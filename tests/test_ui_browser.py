"""``clora ui`` end to end in a real headless browser: Debian's chromium driven by Playwright.

Screenshots go to ``test-artifacts/`` (or ``$CLORA_TEST_ARTIFACTS``). Without chromium the test is
skipped on a developer's machine and fails in CI (``CI`` set), where ``.ci/run`` installs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("CLORA_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = [  # no background connections: this machine's network is closed
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("the browser test needs Debian's chromium (apt-get install chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``clora ui`` as a user starts it, on a free port, in a folder of its own."""
    port = free_port()
    folder = tmp_path_factory.mktemp("ui-server")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "clora.cli", "ui", "--port", str(port), "--device", "cpu"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("clora ui: serving on"):
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert listening.wait(timeout=600), "".join(lines)  # (imports take minutes on a slow machine)
        assert f"clora ui: serving on http://127.0.0.1:{port}\n" in lines, "".join(lines)
        yield f"http://127.0.0.1:{port}/", process
    finally:
        process.terminate()
        process.wait(timeout=30)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "ui-server.log").write_text("".join(lines))


def text_box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_compose_the_demo_in_a_browser(server):
    from playwright.sync_api import expect, sync_playwright

    url, process = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 2200})
        try:
            page.goto(url)
            expect(page.locator("#clora-tokens")).to_contain_text("sks</w> circle</w>", timeout=60_000)
            page.screenshot(path=ARTIFACTS / "ui-opened.png", full_page=True)

            page.click("#clora-generate")
            expect(page.locator("#clora-status")).to_contain_text("done: 1 image(s) from seed 12", timeout=300_000)
            expect(page.locator("#clora-images img").first).to_be_visible()
            expect(page.locator("#clora-maps img").first).to_be_visible()
            page.screenshot(path=ARTIFACTS / "ui-generated.png", full_page=True)

            link = page.locator("a[href*='clora-12.png']").first  # the download link of the PNG
            png = page.request.get(link.get_attribute("href")).body()
            spec = json.loads(Image.open(io.BytesIO(png)).text["clora"])
            assert spec["prompt"] == "a circle and a square" and spec["seed"] == 12
            assert [c["phrase"] for c in spec["concepts"]] == ["circle", "square"]
            assert [c["name"] for c in spec["concepts"]] == ["sks_circle", "zwx_square"]  # no box, still kept
            downloaded = ARTIFACTS / "ui-download.png"
            downloaded.write_bytes(png)

            text_box(page, "clora-phrase-0").fill("triangle")
            expect(page.locator("#clora-problems")).to_contain_text(
                "'triangle' is not a whole word/phrase of the prompt", timeout=30_000
            )
            page.click("#clora-generate")  # a bad form: a message in the page, no traceback, still serving
            expect(page.locator("#clora-status")).to_contain_text("Error: concepts[0].phrase", timeout=30_000)
            page.screenshot(path=ARTIFACTS / "ui-problem.png", full_page=True)
            assert "Traceback" not in page.content()

            page.locator("#clora-restore input[type=file]").set_input_files(str(downloaded))
            expect(page.locator("#clora-status")).to_contain_text("settings restored", timeout=30_000)
            expect(text_box(page, "clora-phrase-0")).to_have_value("circle")
            expect(page.locator("#clora-problems")).to_have_text("", timeout=30_000)

            page.locator("#clora-advanced").get_by_text("advanced").first.click()  # a long run, then Cancel
            steps = text_box(page, "clora-steps")
            expect(steps).to_have_value("20")  # the fold is open and shows the demo's steps
            for _ in range(10):  # (a box just shown by its fold may be re-rendered once with its old value)
                steps.fill("900")
                steps.press("Tab")
                page.wait_for_timeout(300)
                if steps.input_value() == "900":
                    break
            expect(steps).to_have_value("900")
            page.click("#clora-generate")
            expect(page.get_by_text("/900 steps").first).to_be_visible(timeout=120_000)  # the progress bar
            page.screenshot(path=ARTIFACTS / "ui-progress.png", full_page=True)
            page.click("#clora-cancel")
            expect(page.locator("#clora-status")).to_contain_text("cancelled", timeout=120_000)
        finally:
            browser.close()
    assert process.poll() is None  # the server is still up

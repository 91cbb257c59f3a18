"""The status page at the admin root, as a real browser shows it (Chromium, headless)."""

from __future__ import annotations

import html.parser
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Running, need, run
from tests.e2e.test_control import post, start

pytestmark = pytest.mark.e2e


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        try:
            return need(name)
        except pytest.skip.Exception:
            continue
    pytest.skip("chromium is not installed (.ci/run installs it)")


def rendered(chromium: str, url: str, screenshot: Path | None = None) -> str:
    """The DOM after the page loaded, as Chromium built it."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=420,900"]
    if screenshot is not None:
        subprocess.run([chromium, *flags, f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=60, check=True)  # fmt: skip
    result = subprocess.run([chromium, *flags, "--dump-dom", url],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return result.stdout


class States(html.parser.HTMLParser):
    """Each backend row's name and the state the page shows for it."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, str] = {}
        self._in_backends = False
        self._row: list[str] = []
        self._cell = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self._in_backends = found.get("id") == "backends"
        elif tag == "td":
            self._cell = ""
        elif tag == "span" and "data-state" in found and self._in_backends:
            self._row.append(f"state={found['data-state']}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._in_backends:
            self._row.append(self._cell)
        elif tag == "tr" and self._in_backends and self._row:
            state = next((c[6:] for c in self._row if c.startswith("state=")), None)
            if state is not None:
                self.states[self._row[0]] = state
            self._row = []
        elif tag == "table":
            self._in_backends = False

    def handle_data(self, data: str) -> None:
        self._cell += data


def states(chromium: str, running: Running, screenshot: Path | None = None) -> dict[str, str]:
    parser = States()
    page = rendered(chromium, f"http://127.0.0.1:{running.ports['admin']}/", screenshot)
    parser.feed(page)
    return parser.states


def test_the_status_page_shows_the_farm_and_a_drain(farm_ports, tmp_path) -> None:
    chromium = browser()
    with start(tmp_path, farm_ports, "--workers", "2") as running:
        for _ in range(4):
            run("curl", "-s", "-o", "/dev/null", running.url("http"))
        before = states(chromium, running, tmp_path / "before.png")
        assert before == {"web1": "up", "web2": "up"}
        assert post(running, "/backends/web2/drain")[0] == 200
        after = states(chromium, running, tmp_path / "after.png")
        assert after == {"web1": "up", "web2": "draining"}
        page = rendered(chromium, f"http://127.0.0.1:{running.ports['admin']}/")
    assert "Listeners" in page and "How connections ended" in page
    assert "2 worker(s)" in page and "last reload: ok" in page
    assert "(pure Python)" in page or "(compiled (mypyc))" in page
    assert "<th>responses/s</th>" in page and "<th>for</th>" in page
    assert (tmp_path / "after.png").stat().st_size > 1000  # a picture was drawn

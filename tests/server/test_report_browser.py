"""The HTML audit report as a real headless Chromium renders it.

Skipped when no Chromium is installed, unless FEDPRIV_REQUIRE_BROWSER=1 (CI sets
it, after `apt-get install chromium`), in which case a missing browser fails.
"""

import os
import shutil
import stat
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privacy.report import AuditReport, Finding, SiteAudit
from server.report import browser_dump_dom, browser_screenshot, render_html

SITES = ["hospital-a", "hospital-b", "<script>x</script>"]
TAB_BLUE = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first colour: the first site's line
FAIL_RED = np.array([0xC6, 0x28, 0x28])  # the FAIL banner


@pytest.fixture
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("FEDPRIV_REQUIRE_BROWSER") == "1":
        pytest.fail("FEDPRIV_REQUIRE_BROWSER=1 but no chromium: apt-get install chromium")
    pytest.skip("no chromium on PATH (apt-get install chromium)")


@pytest.fixture
def browser_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Chromium's profile and home go under tmp_path, so leftovers can be found by path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _site(name: str, scale: float) -> SiteAudit:
    return SiteAudit(
        site=name, releases=4, levels={"sample": {"rdp": scale, "prv": None, "pld": None}},
        total={"rdp": scale, "prv": None, "pld": None}, accountant="rdp",
        reported=scale, recomputed=scale, cap=2 * scale, spent=scale, remaining=scale,
        num_records=500, noise_generators=["secure"],
        rounds=[1, 2, 3, 4], epsilon_by_round=[scale * r / 4 for r in (1, 2, 3, 4)],
    )


def _report_html(path: Path) -> Path:
    report = AuditReport(
        run_dir="runs/demo", delta=1e-5, accountant="rdp", ledger_rows=12,
        ledger_head="ff00", chain_ok=True, chain_problems=[],
        sites=[_site(name, 1.0 + i) for i, name in enumerate(SITES)],
        findings=[Finding("error", "cap_exceeded", "over the cap", site=SITES[0], seq=3)],
        accuracy_by_round=[(r, 0.5 + 0.1 * r, 0.75 * r) for r in (1, 2, 3, 4)],
        stop_reason=None, config_hash=None, versions={"opacus": "1.6.0"},
        created_at="2024-05-01T12:00:00Z",
    )
    path.write_text(render_html(report), encoding="utf-8")
    return path


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.site_rows = 0
        self.images: list[str] = []
        self.tags: list[str] = []
        self._in_sites_body = False
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self._table = a.get("id")
        self._in_sites_body |= tag == "tbody" and self._table == "sites"
        self.site_rows += tag == "tr" and self._in_sites_body
        if tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("tbody", "table"):
            self._in_sites_body = False


def _live_processes_mentioning(text: str) -> list[str]:
    """Command lines of running (not zombie) processes that mention ``text``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def _assert_no_browser_left(tmp: Path) -> None:
    if not Path("/proc/self").exists():
        return
    deadline = time.monotonic() + 5
    while _live_processes_mentioning(str(tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_processes_mentioning(str(tmp)) == []


def test_rendered_dom_has_the_sites_table_and_embedded_plots(chromium: str, browser_tmp: Path):
    # Prepare
    page = _report_html(browser_tmp / "report.html")

    # Execute
    dom = _Dom()
    dom.feed(browser_dump_dom(page, chromium=chromium))

    # Assert
    assert dom.site_rows == len(SITES)
    assert len(dom.images) == 2
    assert all(src.startswith("data:image/png;base64,") for src in dom.images)
    assert "script" not in dom.tags  # the site named <script>x</script> stayed text
    _assert_no_browser_left(browser_tmp)


def test_screenshot_has_the_requested_size_and_shows_banner_and_plots(
    chromium: str, browser_tmp: Path
):
    # Prepare
    page = _report_html(browser_tmp / "report.html")
    shot = browser_tmp / "shot.png"

    # Execute
    browser_screenshot(page, shot, width=1280, height=2000, chromium=chromium)

    # Assert
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        rgb = np.asarray(image.convert("RGB")).astype(int)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    assert len(np.unique(packed)) > 200  # text antialiasing and plots, not a flat page
    assert (rgb.min(axis=-1) < 250).mean() > 0.02  # not a blank white page
    assert (np.abs(rgb - FAIL_RED).max(axis=-1) <= 8).sum() > 5000
    assert (np.abs(rgb - TAB_BLUE).max(axis=-1) <= 8).sum() > 200  # a plot line was painted
    _assert_no_browser_left(browser_tmp)


def test_missing_browser_raises_with_an_install_hint(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        browser_screenshot(tmp_path / "r.html", tmp_path / "s.png",
                           chromium=str(tmp_path / "no-such-chromium"))


def test_a_hanging_browser_is_killed_with_its_children(tmp_path: Path):
    # Prepare: a fake browser that starts a helper and never returns.
    fake = tmp_path / "fake-chromium"
    fake.write_text('#!/bin/sh\nsleep 60 &\necho $! > "$(dirname "$0")/child.pid"\nwait\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)

    # Execute
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        browser_screenshot(tmp_path / "r.html", tmp_path / "s.png", chromium=str(fake),
                           timeout=1)

    # Assert
    assert time.monotonic() - start < 10
    child = Path("/proc") / (tmp_path / "child.pid").read_text().strip()
    time.sleep(0.2)
    if child.exists():  # a zombie waiting for init to reap it is dead
        assert child.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

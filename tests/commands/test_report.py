"""``polmctl report``: the page of a run dir, checked in a real headless Chromium (Debian's package): it
renders (headings, table rows), every plot holds a PNG with pixels, and the page fetches nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from polmctl.commands.report import write_report
from tests.commands.fake_runs import PROMPTS, fake_pipeline, fake_run

pytestmark = pytest.mark.cli

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: apt-get install -y --no-install-recommends chromium (.ci/run does)",
)
# The flags headless Chromium needs on these machines (no sandbox as root, no background networking).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: a page that needs the network shows it
]


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def polmctl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "polmctl", *args], capture_output=True, text=True, env=env, timeout=300
    )


class Dom(HTMLParser):
    """What the tests read of a dumped DOM: headings, images, link targets, table rows, element ids."""

    def __init__(self, html: str):
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.refs: list[str] = []  # every src and href
        self.rows: dict[str, list[list[str]]] = {}  # table class -> rows of cell texts
        self.ids: list[str] = []
        self._heading: list[str] | None = None
        self._table: list[str] = []
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if attrs.get("id"):
            self.ids.append(attrs["id"])
        if tag in ("h1", "h2", "h3", "h4"):
            self._heading = []
        elif tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "table":
            self._table.append(attrs.get("class") or "")
            self.rows.setdefault(self._table[-1], [])
        elif tag == "tr" and self._table:
            self.rows[self._table[-1]].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4") and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None
        elif tag == "table" and self._table:
            self._table.pop()
        elif tag in ("td", "th") and self._cell is not None and self._table:
            self.rows[self._table[-1]][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)
        if self._cell is not None:
            self._cell.append(data)


def page_requests(netlog: Path) -> list[str]:
    """URLs the page itself asked the network for (Chromium's own update and account checks excluded:
    the page's requests carry its file:// origin in their network isolation key)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start and "file://" in str(params.get("network_isolation_key", "")):
            if not str(params.get("url", "")).startswith(("file:", "data:")):
                urls.append(params["url"])
    return urls


def png_size(uri: str) -> tuple[int, int]:
    assert uri.startswith("data:image/png;base64,"), uri[:60]
    data = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        lo, hi = image.convert("L").getextrema()
        assert hi - lo > 100, "a blank plot"  # axes and lines on white
        return image.size


@needs_chromium
def test_a_run_page_renders_in_chromium_every_plot_has_data_and_nothing_is_fetched(tmp_path):
    run = fake_run(tmp_path / "run", rewards=True)
    page = tmp_path / "page.html"
    result = polmctl("report", str(run), "--out", str(page), "--samples", "5")
    assert result.returncode == 0, result.stderr
    assert f"report: {page}" in result.stdout

    netlog = tmp_path / "netlog.json"
    shown = chromium(tmp_path, page, "--dump-dom", f"--log-net-log={netlog}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = Dom(shown.stdout)
    assert dom.headings[0] == "polmctl report: lora"
    for heading in ("Summary", "Evaluation", "Training curves", "Generations"):
        assert heading in dom.headings, dom.headings
    facts = dict(r for r in dom.rows["facts"] if len(r) == 2)
    assert facts["status"] == "completed" and facts["wall time"] == "20.2 s" and facts["peak memory"] == "812 MB"
    assert ["arithmetic / accuracy", "0.25", "0.75", "+0.5"] in dom.rows["eval"]

    # loss, reward, KL, learning rate: one PNG each, with pixels, drawn from the 12 logged steps
    assert len(dom.images) == 4
    for uri in dom.images:
        width, height = png_size(uri)
        assert width > 300 and height > 150
    assert not [r for r in dom.refs if re.match(r"(?i)\s*(https?:)?//", r)], dom.refs

    generations = dom.rows["gen"]
    assert generations[0] == ["#", "prompt", "expected", "before", "after"] and len(generations) == 1 + 5
    first = generations[1]  # before: 3/12 right, after: 9/12, the same prompt side by side
    assert first[1] == PROMPTS[0] and first[3] == first[4] == "The answer is 5."
    assert generations[4][3].startswith("I think it is 3.") and generations[4][4] == "The answer is 11."
    assert "<b>" not in shown.stdout.split('<table class="gen">', 1)[1]  # the prompt's markup is text
    assert "arithmetic: before 3/12 correct · after 9/12 correct" in dom.headings
    assert page_requests(netlog) == []


@needs_chromium
def test_the_network_check_sees_a_page_that_fetches(tmp_path):
    """The check above can fail: a page with a remote image and stylesheet is caught by both parts."""
    page = tmp_path / "remote.html"
    page.write_text(
        '<h1>x</h1><img src="http://example.invalid/a.png"><link rel="stylesheet" href="https://cdn.example.invalid/a.css">'
    )
    netlog = tmp_path / "netlog.json"
    shown = chromium(tmp_path, page, "--dump-dom", f"--log-net-log={netlog}")
    assert shown.returncode == 0
    assert sorted(page_requests(netlog)) == ["http://example.invalid/a.png", "https://cdn.example.invalid/a.css"]
    assert [r for r in Dom(shown.stdout).refs if re.match(r"(?i)\s*(https?:)?//", r)]


@needs_chromium
def test_a_pipeline_page_has_its_stage_table_and_a_section_per_stage(tmp_path):
    run = fake_pipeline(tmp_path / "pipe")
    page = write_report(run)
    assert page == run / "report.html"
    netlog = tmp_path / "netlog.json"
    shown = chromium(tmp_path, page, "--dump-dom", f"--log-net-log={netlog}")
    dom = Dom(shown.stdout)
    assert dom.headings[0] == "polmctl report: pipeline survey"
    assert "Stages" in dom.headings and "Stage 1: sft (lora)" in dom.headings and "Stage 2: grpo (grpo)" in dom.headings
    assert {"stage-1-sft", "stage-2-grpo"} <= set(dom.ids) and {"#stage-1-sft", "#stage-2-grpo"} <= set(dom.refs)
    header, sft, grpo = dom.rows["stages"]
    assert header[:5] == ["stage", "paradigm", "recipe", "metric (held-out set)", "before -> after"]
    assert sft[:3] == ["1. sft", "fine-tuning", "lora"] and sft[4] == "0.25 -> 0.5 (+0.25)"
    assert grpo[:3] == ["2. grpo", "reasoning", "grpo"] and grpo[4] == "0.5 -> 0.75 (+0.25) [before: from 1. sft]"
    assert "arithmetic accuracy on builtin:arithmetic, test split, 12 rows" in grpo[3]
    assert len(dom.images) == 2 + 4  # sft: loss, lr; grpo: loss, reward, KL, lr
    for uri in dom.images:
        png_size(uri)
    assert page_requests(netlog) == []


@needs_chromium
def test_the_screenshot_shows_the_page(tmp_path):
    page = write_report(fake_pipeline(tmp_path / "pipe"), tmp_path / "page.html")
    shot = tmp_path / "page.png"
    chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, tables and plots, not a blank or error page


def test_report_refuses_a_missing_dir_and_a_dir_that_is_no_run(tmp_path):
    missing = polmctl("report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = polmctl("report", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "is not a run dir" in empty.stderr


def test_a_run_that_logged_no_steps_gets_a_page_without_curves(tmp_path):
    run = fake_run(tmp_path / "prune", recipe="prune", paradigm="efficiency")
    (run / "metrics.jsonl").unlink()
    (run / ".hydra" / "config.yaml").unlink()
    (tmp_path / "out").mkdir()
    written = write_report(run, tmp_path / "out")  # an existing dir: report.html inside it
    assert written == tmp_path / "out" / "report.html"
    html = written.read_text()
    assert "Training curves" not in html and "<img" not in html and "Evaluation" in html
    assert "polmctl report: prune" in html


def test_a_failed_pipeline_shows_the_error_and_its_pending_stages(tmp_path):
    run = fake_pipeline(tmp_path / "pipe")
    summary = json.loads((run / "summary.json").read_text())
    summary["status"], summary["failed_stage"] = "failed", "grpo"
    summary["stages"][1].update(status="failed", error="DataError: data file missing.jsonl does not exist")
    summary["stages"].append({"name": "merge", "recipe": "merge", "run_dir": str(run / "3-merge"), "status": "pending"})
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "2-grpo" / "error.log").write_text("Traceback (most recent call last):\nDataError: missing.jsonl <x>\n")

    html = write_report(run).read_text()
    assert "DataError: missing.jsonl &lt;x&gt;" in html and "<summary>error.log</summary>" in html
    assert "pending: not run yet" in html and 'id="stage-3-merge"' in html
    assert '<td><a href="#stage-3-merge">3. merge (pending)</a></td><td>integration</td><td>merge</td>' in html

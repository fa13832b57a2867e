"""report.html / report.md: self-contained, valid, escaped, several runs side by side, with a baseline."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from evalctx.cli import main as cli_main  # noqa: E402
from evalctx.report import write_report  # noqa: E402
from run_fixtures import write_run  # noqa: E402

OPTS = {"tasks": ("passkey", "niah_single"), "lengths": (4096, 8192, 16384), "depths": (0.0, 1.0)}
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}
EVIL = "<script>alert(1)</script>"


class Checker(HTMLParser):
    """Collects what a self-contained page must not have and checks that tags nest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)
        for name, value in attrs:
            value = value or ""
            if name == "id":
                self.ids.add(value)
            if name == "href":
                self.hrefs.append(value)
            if name in ("src", "srcset", "data", "action", "poster"):
                self.srcs.append(value)
            if name.startswith("on"):
                self.errors.append(f"event handler {name}")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    base = write_run(root, "base", label="fp16-baseline", **OPTS)
    fp16 = write_run(root, "fp16", label="fp16", **OPTS)
    int8 = write_run(root, "int8", label=f"int8kv {EVIL}", miss_from=16384, error_from=16384, status="interrupted",
                     engine={"dtype": "float16", "kv_cache_quant_algo": "INT8", "tp": 2}, **OPTS)
    html_path, md_path = write_report([fp16, int8], root / "out", baseline=base)
    return html_path, md_path, root


def test_html_is_valid_and_self_contained(report) -> None:
    html_path, _, _ = report
    text = html_path.read_text(encoding="utf-8")
    checker = Checker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not checker.errors and not checker.stack
    assert "script" not in checker.tags and "link" not in checker.tags and "iframe" not in checker.tags
    assert checker.srcs and all(s.startswith("data:image/png;base64,") for s in checker.srcs)
    for src in checker.srcs:
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert checker.hrefs and all(h.startswith("#") and h[1:] in checker.ids for h in checker.hrefs)
    assert not re.search(r"url\(|@import|https?://", text)


def test_html_escapes_user_text(report) -> None:
    html_path, md_path, _ = report
    text = html_path.read_text(encoding="utf-8")
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert EVIL not in md_path.read_text(encoding="utf-8")


def test_report_content(report) -> None:
    html_path, md_path, root = report
    checker = Checker()
    checker.feed(html_path.read_text(encoding="utf-8"))
    page = " ".join(checker.text)
    for heading in ("Runs", "Engine configuration", "Effective length", "Accuracy by length", "Plots",
                    "Errors and unsupported samples", "Comparison with the baseline"):
        assert heading in page
    assert "results are partial" in page  # the interrupted run is flagged
    assert "CUDA out of memory at 16384 tokens" in page
    assert "INT8" in page and "kv_cache_quant_algo" in page
    assert "1.000 [0.839, 1.000]" in page  # 20/20 with its Wilson interval
    assert "REGRESSION" in page and "PASS" in page  # int8 vs baseline fails, fp16 passes
    md = md_path.read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images and all((md_path.parent / p).is_file() and p.startswith("plots/") for p in images)
    # 2 accuracy plots + 2 tasks x 2 labels heatmaps + latency
    assert len(images) == 7
    assert "| task | length | label |" in md


def test_report_command_defaults_to_the_first_run_dir(tmp_path, capsys) -> None:
    run = write_run(tmp_path, "only", tasks=("passkey",), lengths=(4096, 8192), depths=(0.5,), samples=4)
    assert cli_main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "report.md").is_file() and (run / "plots").is_dir()
    assert "report.html" in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "missing")]) == 2


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and Path(p).exists()), None)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(report, tmp_path) -> None:
    html_path, _, _ = report
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--screenshot={shot}", "--window-size=1280,4000", html_path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000

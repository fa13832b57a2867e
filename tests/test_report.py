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


RESULTS = ["Effective length", "Average over tasks", "Heatmaps", "Accuracy vs context length", "Wrong answers",
           "Latency", "Comparison with the baseline", "Errors and unsupported samples", "Accuracy by length and depth"]
METADATA = ["Settings used", "Runs", "Engine configuration and options"]


def test_report_content(report) -> None:
    html_path, md_path, root = report
    checker = Checker()
    checker.feed(html_path.read_text(encoding="utf-8"))
    page = " ".join(checker.text)
    assert "results are partial" in page  # the interrupted run is flagged
    assert "CUDA out of memory at 16384 tokens" in page
    assert "INT8" in page and "kv_cache_quant_algo" in page
    assert "1.000 [0.839, 1.000]" in page  # 20/20 with its Wilson interval
    assert "REGRESSION" in page and "PASS" in page  # int8 vs baseline fails, fp16 passes
    md = md_path.read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images and all((md_path.parent / p).is_file() and p.startswith("plots/") for p in images)
    # 2 tasks x (2 labels' heatmaps + 2 difference heatmaps against the baseline + 1 accuracy plot) + latency
    assert len(images) == 11
    assert "| task | length | label |" in md


def test_results_come_before_metadata(report) -> None:
    _, md_path, _ = report
    headings = re.findall(r"^## (.+)$", md_path.read_text(encoding="utf-8"), re.M)
    assert headings == RESULTS + METADATA


def test_headline_table_gives_percent_with_n_and_the_effective_length(report) -> None:
    _, md_path, _ = report
    md = md_path.read_text(encoding="utf-8")
    head = md[md.index("## Effective length"):md.index("## Average over tasks")]
    assert "| task | label | 4K | 8K | 16K | effective (≥ 85.6%) | effective (≥ 0.85 × shortest) |" in head
    assert "| passkey | fp16 | 100.0% (n=40) | 100.0% (n=40) | 100.0% (n=40) | ≥16K | ≥16K |" in head
    # The interrupted int8 run: every 16K sample an error, so no scored sample there.
    assert re.search(r"\| passkey \| int8kv .*\| 100\.0% \(n=40\) \| n=0 \| 8K \| 8K \|", head)


def test_markdown_has_no_html_entities_nor_needless_escapes(report) -> None:
    _, md_path, _ = report
    md = md_path.read_text(encoding="utf-8")
    assert not re.search(r"&(#\d+|#x[0-9a-fA-F]+|[A-Za-z]+);", md)
    assert ">=" not in md and "\\>" not in md  # "≥16K", not "\>=16K"


def test_latency_columns_share_one_format_with_the_unit_in_each_cell(tmp_path) -> None:
    """4 significant digits put "2.17e-05" under "0.0001203" in one column (a fast server next to a slow one);
    every latency cell is now a short number and its unit."""
    fast = write_run(tmp_path, "fast", label="fast", latency_scale=1e-3, **OPTS)
    slow = write_run(tmp_path, "slow", label="slow", latency_scale=50.0, **OPTS)
    _, md_path = write_report([fast, slow], tmp_path / "out")
    md = md_path.read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| task | length | label | n |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    timed = [cols.index(c) for c in ("latency p50", "latency p95", "TTFT p50")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines()
             if ln.startswith("| passkey | ") and ln.count("|") == len(cols) + 1]
    assert cells
    values = [row[i] for row in cells for i in timed]
    assert all(re.fullmatch(r"[\d,]+(\.\d+)? (µs|ms|s)", v) for v in values), values
    assert {v.split()[1] for v in values} >= {"µs", "s"}  # both ends of the range, each in its own unit


def test_a_run_without_scored_samples_does_not_claim_every_answer_right(tmp_path) -> None:
    run = write_run(tmp_path, "down", label="down", tasks=("passkey",), lengths=(4096,), depths=(0.5,), samples=4,
                    error_from=4096)
    _, md_path = write_report([run], tmp_path / "out")
    wrong = md_path.read_text().split("## Wrong answers", 1)[1].split("\n## ", 1)[0]
    assert "answered right" not in wrong and "No sample was scored" in wrong


def test_plot_files_are_named_by_task_and_label(report) -> None:
    _, _, root = report
    label = "int8kv-script-alert-1-script"  # "int8kv <script>alert(1)</script>", sanitised
    names = {p.name for p in (root / "out" / "plots").iterdir()}
    assert names == {
        *(f"heatmap_{t}_{lab}.png" for t in ("passkey", "niah_single") for lab in ("fp16", label)),
        *(f"difference_{t}_{lab}-vs-fp16-baseline.png" for t in ("passkey", "niah_single")
          for lab in ("fp16", label)),
        "accuracy_passkey.png", "accuracy_niah_single.png", "latency.png"}


def test_one_run_names_plots_by_task_and_removes_stale_ones(tmp_path) -> None:
    run = write_run(tmp_path, "only", label="m", tasks=("passkey",), lengths=(4096, 8192), depths=(0.5,), samples=4)
    plots_dir = run / "plots"
    plots_dir.mkdir()
    for old in ("heatmap_01.png", "accuracy_00.png", "difference_passkey_x-vs-y.png"):
        (plots_dir / old).write_bytes(b"old")  # an earlier report's plots
    (plots_dir / "my_notes.png").write_bytes(b"mine")
    _, md = write_report([run])
    assert {p.name for p in plots_dir.iterdir()} == {"heatmap_passkey.png", "accuracy_passkey.png", "latency.png",
                                                    "my_notes.png"}
    assert "difference heatmap" not in md.read_text()  # one run: nothing to compare


def test_two_runs_get_a_difference_heatmap_without_a_baseline(tmp_path) -> None:
    a = write_run(tmp_path, "a", label="fp16", tasks=("passkey",), lengths=(4096, 8192), depths=(0.5,), samples=6)
    b = write_run(tmp_path, "b", label="int8", tasks=("passkey",), lengths=(4096, 8192), depths=(0.5,), samples=6,
                  miss_from=8192, miss_rate=1.0)
    _, md = write_report([a, b], tmp_path / "out")
    text = md.read_text()
    assert "![passkey: difference heatmap, int8 minus fp16](plots/difference_passkey_int8-vs-fp16.png)" in text
    assert "fp16 is the reference (the first run given), int8 the candidate" in text
    assert "## Comparison with the baseline" not in text  # the gate table needs --baseline
    three = write_run(tmp_path, "c", label="lora", tasks=("passkey",), lengths=(4096,), depths=(0.5,), samples=2)
    _, md = write_report([a, b, three], tmp_path / "out3")
    assert "difference heatmap" not in md.read_text()  # which pair? --baseline says


def test_a_baseline_of_the_same_label_is_named_by_run(tmp_path) -> None:
    opts = {"tasks": ("passkey",), "lengths": (4096,), "depths": (0.5,), "samples": 2}
    base, cand = write_run(tmp_path, "mon", label="tiny", **opts), write_run(tmp_path, "tue", label="tiny", **opts)
    _, md = write_report([cand], tmp_path / "out", baseline=base)
    assert "(plots/difference_passkey_tiny-tue-vs-tiny-mon.png)" in md.read_text()


@pytest.mark.parametrize(("parts", "want"), [
    (("passkey",), "heatmap_passkey.png"),
    (("niah_single", "int8 kv/v2"), "heatmap_niah_single_int8-kv-v2.png"),
    (("passkey", "..hidden"), "heatmap_passkey_hidden.png"),
    (("passkey", "modèle ü"), "heatmap_passkey_modele-u.png"),
    (("passkey", "!!!"), "heatmap_passkey_x.png"),
])
def test_plot_file_names(parts, want, tmp_path) -> None:
    from evalctx.report.render import PlotFiles

    assert PlotFiles(tmp_path).path("heatmap", *parts).name == want


def test_plot_file_names_never_collide(tmp_path) -> None:
    from evalctx.report.render import PlotFiles

    files = PlotFiles(tmp_path)
    got = [files.path("heatmap", "t", lab).name for lab in ("a/b", "a b", "A-B", "a-b")]
    assert got == ["heatmap_t_a-b.png", "heatmap_t_a-b-2.png", "heatmap_t_A-B-3.png", "heatmap_t_a-b-4.png"]


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
    # The DOM the browser built: every plot an image, the evil label text only, the results before the metadata.
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          html_path.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img ") == 11 and "<script" not in dom and "&lt;script&gt;" in dom
    headings = re.findall(r'<h2 id="[^"]*">([^<]+)</h2>', dom)
    assert headings == RESULTS + METADATA

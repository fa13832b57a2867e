"""Reports show user text (labels, server error messages) as text in every format, and never a secret: Markdown
checked by rendering it with a CommonMark parser, matplotlib labels with "$", API keys in the manifest and reports."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("matplotlib")
markdown_it = pytest.importorskip("markdown_it")

from evalctx.cli import main  # noqa: E402
from evalctx.report import write_report  # noqa: E402
from evalctx.report.document import md_escape  # noqa: E402
from evalctx.report.plots import accuracy_vs_length, heatmap  # noqa: E402
from run_fixtures import write_run  # noqa: E402

MD = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])
LABEL = "![x](https://evil.example/t.png) <img src=https://evil.example/i.png> $5 *bold* `code` | [l](u) & $"
ERROR = "server said: <script>alert(1)</script> ![p](http://evil.example/p.png)\nsecond line | cell"
SECRET = "sk-live-0123456789abcdef"
ANSWER = ' <img src=x onerror=alert(1)> | *no* [a](http://evil.example/a) &amp; \n`x`'  # a wrong completion
OPTS = {"tasks": ("passkey",), "lengths": (4096, 8192), "depths": (0.0, 1.0), "samples": 4}


def text_of(rendered: str) -> str:
    """The visible text of rendered HTML, with <br> as a newline."""
    rendered = rendered.replace("<br>", "\n").replace("<br />", "\n")
    return html.unescape(re.sub(r"<[^>]+>", "", rendered))


@settings(max_examples=400, deadline=None)
@given(st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from(["\n", "é", "\t"]),
               min_size=1, max_size=40))
def test_md_escape_renders_as_the_text_itself(text: str) -> None:
    want = "\n".join(line.strip() for line in text.split("\n")).strip()
    para = MD.render(md_escape(text))
    cell = MD.render(f"| h |\n|---|\n| {md_escape(text)} |\n")
    cell = re.search(r"<td>(.*?)</td>", cell, re.S).group(1)  # type: ignore[union-attr]
    for rendered in (para, cell):
        assert "<img" not in rendered and "<a " not in rendered and "<script" not in rendered
        got = text_of(rendered).strip()
        assert "\n".join(line.strip() for line in got.split("\n")) == want, (text, md_escape(text), rendered)


def test_fence_outlasts_backticks_in_the_text() -> None:
    from evalctx.report.document import Document

    doc = Document("t")
    doc.pre("a ```` b")
    assert text_of(MD.render(doc.render_md())).strip().endswith("a ```` b")


@pytest.fixture(scope="module")
def evil_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("evil")
    run = write_run(root, "evil", label=LABEL, error_from=8192, **OPTS)
    rows = json.loads((run / "manifest.json").read_text())
    rows["command"] = f"evalctx run --backend http --backend-opt api_key={SECRET} --backend-opt " \
                      f"base_url=https://user:{SECRET}@host/v1"
    rows["backend"]["options"] = {"api_key": SECRET, "concurrency": 4}
    (run / "manifest.json").write_text(json.dumps(rows))  # as evalctx wrote manifests before it masked them
    import pandas as pd

    df = pd.read_parquet(run / "results.parquet")
    df.loc[df["status"] == "error", "error"] = ERROR
    wrong = df.index[df["status"] == "ok"][:1]
    df.loc[wrong, ["score", "completion"]] = [0.0, ANSWER]
    df.to_parquet(run / "results.parquet", index=False)
    import warnings

    with warnings.catch_warnings():  # the long label squeezes the heatmap's axes
        warnings.filterwarnings("ignore", "constrained_layout not applied")
        html_path, md_path = write_report([run], root / "out")
    return html_path, md_path, root


def test_markdown_report_shows_labels_and_errors_as_text(evil_report: tuple[Path, Path, Path]) -> None:
    _, md_path, _ = evil_report
    rendered = MD.render(md_path.read_text(encoding="utf-8"))
    srcs = re.findall(r'<img src="([^"]*)"', rendered)
    assert srcs and all(s.startswith("plots/") for s in srcs)  # only our own plots load
    assert "<script" not in rendered and "evil.example/t.png\"" not in rendered
    text = text_of(rendered)
    assert LABEL in text  # the label reads exactly as typed
    assert "server said: <script>alert(1)</script> ![p](http://evil.example/p.png)\nsecond line | cell" in text


def test_wrong_answers_show_as_text_quoted(evil_report: tuple[Path, Path, Path]) -> None:
    """The model's answer is quoted as a JSON string (leading space and newline visible) and is text in both
    formats: no tag, link or entity of it survives."""
    html_path, md_path, _ = evil_report
    quoted = json.dumps(ANSWER)
    rendered = MD.render(md_path.read_text(encoding="utf-8"))
    assert quoted in text_of(rendered)
    assert "evil.example/a\"" not in rendered and "<img src=x" not in rendered
    page = html_path.read_text(encoding="utf-8")
    assert html.escape(quoted) in page and "<img src=x" not in page and "&amp;amp;" in page


def test_html_report_escapes_the_same_text(evil_report: tuple[Path, Path, Path]) -> None:
    html_path, _, _ = evil_report
    page = html_path.read_text(encoding="utf-8")
    assert "<script>" not in page and "https://evil.example" in page  # as text, never as a src or href
    assert not re.search(r'(src|href)="https?://', page)


def test_reports_mask_secrets_of_old_manifests(evil_report: tuple[Path, Path, Path]) -> None:
    html_path, md_path, _ = evil_report
    for p in (html_path, md_path):
        raw = p.read_text(encoding="utf-8")
        assert SECRET not in raw, p
        text = text_of(MD.render(raw) if p.suffix == ".md" else raw)
        assert "api_key=***" in text and "user:***@host" in text, p


@pytest.mark.parametrize("label", ["cost $5", "$x$", "a $ b $ c $", "_hidden", r"\$"])
def test_dollar_and_underscore_labels_draw_as_typed(tmp_path: Path, label: str) -> None:
    from evalctx.analysis.runs import load_run

    df = load_run(write_run(tmp_path, "d", label=label, **OPTS))
    fig = heatmap(df, "passkey", path=tmp_path / "h.png")
    assert fig.axes[0].get_title().replace("\\$", "$").lstrip() .startswith(label)
    fig = accuracy_vs_length(df, "passkey", path=tmp_path / "a.png")
    legend = [t.get_text().replace("\\$", "$").lstrip() for t in fig.axes[0].get_legend().get_texts()]
    assert label in legend  # shown, not dropped as a "_" hidden entry


def test_api_key_never_reaches_manifest_or_reports(tmp_path: Path) -> None:
    """A real run through the http backend against `evalctx serve` (fake), with the key on the command line."""
    from http_helpers import serving

    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.fake import FakeBackend
    from evalctx.serve import make_server
    from evalctx.models.tokenizer import ByteTokenizer

    pd = pytest.importorskip("pandas")
    tok = ByteTokenizer()
    server = make_server(FakeBackend(parse_options(FakeBackend, {}), BackendContext(tokenizer=tok)), tok, "fake",
                         port=0, quiet=True)
    suite = Path(__file__).parent / "data" / "suites" / "fake_small.toml"
    with serving(server) as url:
        argv = ["run", "--suite", str(suite), "--backend", "http", "--tokenizer", "byte", "--out", str(tmp_path),
                "--run-id", "r", "--no-progress", "--backend-opt", "model=fake", "--backend-opt",
                f"base_url={url}", "--backend-opt", f"api_key={SECRET}"]
        assert main(argv) == 0
        argv[-1] = "api_key=sk-rotated"  # a new key is the same configuration: the run resumes
        assert main(argv) == 0
    manifest = (tmp_path / "r" / "manifest.json").read_text()
    assert json.loads(manifest)["n_samples"] == len(pd.read_parquet(tmp_path / "r" / "results.parquet"))
    assert SECRET not in manifest and "sk-rotated" not in manifest and "api_key=***" in manifest
    write_report([tmp_path / "r"])
    for name in ("report.html", "report.md", "results.parquet", "summary.csv", "journal/replica-0.jsonl"):
        assert SECRET.encode() not in (tmp_path / "r" / name).read_bytes(), name


def test_a_stop_reason_quoting_a_url_password_is_masked(tmp_path: Path) -> None:
    """The manifest's stopped_by holds the error that ended the run; an http error quotes base_url, password
    and all (it was written in full: the field is added after the manifest is masked)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    suite = Path(__file__).parent / "data" / "suites" / "fake_small.toml"
    argv = ["run", "--suite", str(suite), "--backend", "http", "--tokenizer", "byte", "--out", str(tmp_path),
            "--run-id", "r", "--label", "m", "--no-progress", "--backend-opt",
            f"base_url=http://user:{SECRET}@127.0.0.1:{port}",
            "--backend-opt", "retries=0"]
    assert main(argv) == 2
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "user:***@127.0.0.1" in manifest["stopped_by"]
    assert SECRET not in json.dumps(manifest)

"""Whole runs through the http backend against a stub that behaves like llama-cpp-python's server where the real one
was observed (tests/http_helpers.LlamaCppStub): every mode either agrees with the oracle or stops or errors with
the right message, and a run with error rows is never green (status, exit code, report, gate, run_eval.sh)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from http_helpers import LlamaCppStub, Reply, StubServer, completion, free_port, serving

from evalctx.backends.fake import oracle_answer
from evalctx.cli import main
from evalctx.models.tokenizer import ByteTokenizer

SUITE_TOML = """
name = "http_small"
seed = 5
[[tasks]]
task = "passkey"
lengths = [300, 600]
depths = [0.0, 0.5, 1.0]
samples = 2
max_new_tokens = 12
[[tasks]]
task = "niah_single"
lengths = [400]
depths = [0.0, 1.0]
samples = 2
max_new_tokens = 16
"""
N_SAMPLES = 16


@pytest.fixture
def suite(tmp_path: Path) -> str:
    path = tmp_path / "http_small.toml"
    path.write_text(SUITE_TOML)
    return str(path)


def run(tmp_path: Path, suite: str, url: str, run_id: str, *opts: str, tokenizer: str = "byte",
        args: tuple[str, ...] = ()) -> int:
    flags = [x for o in (f"base_url={url}", "backoff_s=0.01", *opts) for x in ("--backend-opt", o)]
    return main(["run", "--suite", suite, "--backend", "http", "--tokenizer", tokenizer, "--out", str(tmp_path),
                 "--run-id", run_id, "--no-progress", "--batch-size", "4", *flags, *args])


def rows(tmp_path: Path, run_id: str) -> pd.DataFrame:
    return pd.read_parquet(tmp_path / run_id / "results.parquet")


def manifest(tmp_path: Path, run_id: str) -> dict[str, Any]:
    return json.loads((tmp_path / run_id / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
def test_llamacpp_like_server_streams_at_batch_4_and_agrees_sample_by_sample(tmp_path: Path, suite: str) -> None:
    """The issue's failing mode: streaming, --batch-size 4, a server that cuts a running stream when another
    request arrives and sends no usage. Recognised as llama.cpp: one request in flight, repeat_penalty 1.0, every
    streamed answer verified by the same request without streaming."""
    assert main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "direct", "--no-progress"]) == 0
    direct = rows(tmp_path, "direct").set_index("sample_id")
    stub = LlamaCppStub(ByteTokenizer())
    with stub.run() as url:
        assert run(tmp_path, suite, url, "stream") == 0
    df = rows(tmp_path, "stream").set_index("sample_id")
    assert len(df) == N_SAMPLES and (df["status"] == "ok").all() and stub.n_cut == 0
    assert df.loc[direct.index, "completion"].tolist() == direct["completion"].tolist()
    assert (df["n_prompt_tokens"] == df["context_length"]).all()
    assert (df["n_output_tokens"] == [len(t.encode()) for t in df["completion"]]).all()
    assert df["ttft_s"].notna().all() and (df["batch_size"] == 1).all()
    m = manifest(tmp_path, "stream")
    assert m["label"] == "tiny.gguf"  # the served model's name, not "http"
    assert m["backend"]["server"]["preset"] == "llamacpp" and m["backend"]["server"]["version"] == "0.3.36"
    assert m["backend"]["sampling"]["repeat_penalty"] == 1.0
    streamed = [b for b in stub.bodies if b.get("stream")]
    probes = [b for b in stub.bodies if b["max_tokens"] == 24 and not b.get("stream")]
    assert len(probes) == 3  # the greedy check: one probe prompt sent three times before any sample
    # each stream, then its replay
    assert len(streamed) == N_SAMPLES and len(stub.bodies) == 2 * N_SAMPLES + len(probes)


def test_streams_cut_by_concurrent_requests_never_become_ok_rows(tmp_path: Path, suite: str) -> None:
    stub = LlamaCppStub(ByteTokenizer(), token_s=0.01)
    with stub.run() as url:
        code = run(tmp_path, suite, url, "cut", "concurrency=4", "retries=0")
    df = rows(tmp_path, "cut")
    assert stub.n_cut > 0 and code == 3
    errors = df[df["status"] == "error"]
    assert len(errors) > 0 and errors["error"].str.contains("without a finish_reason").all()
    ok = df[df["status"] == "ok"]
    for _, r in ok.iterrows():  # an ok row is a whole answer: the oracle's, never a cut " " or " 8"
        assert r["completion"].endswith(".") and r["finish_reason"] == "stop"


def test_chat_through_the_chat_endpoint_stops_with_the_template_message(tmp_path: Path, suite: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with LlamaCppStub(ByteTokenizer(chat=True)).run() as url:
        code = run(tmp_path, suite, url, "chat", "endpoint=chat", tokenizer="byte-chat",
                   args=("--prompt-mode", "chat"))
    err = capsys.readouterr().err
    assert code == 2 and "continue_final_message" in err and "endpoint=completions" in err
    assert "tokenizer differs" not in err


def test_chat_prompts_through_completions_leave_the_bos_text_to_llamacpp(tmp_path: Path, suite: str) -> None:
    """The tiny model's chat template starts with "<s>" as text; llama.cpp adds a BOS and parses "<s>" as a second
    one whatever add_special_tokens says, so the prompt goes without it and the counts match."""
    from evalctx.models.tokenizer import load_tokenizer

    stub = LlamaCppStub(load_tokenizer("tiny"))
    with stub.run() as url:
        code = run(tmp_path, suite, url, "chat", tokenizer="tiny", args=("--prompt-mode", "chat"))
    df = rows(tmp_path, "chat")
    assert code == 0 and (df["status"] == "ok").all()
    assert (df["n_prompt_tokens"] == df["context_length"]).all()
    assert all(not b["prompt"].startswith("<s>") and "add_special_tokens" not in b for b in stub.bodies)


def test_token_ids_to_llamacpp_stop_at_once(tmp_path: Path, suite: str, capsys: pytest.CaptureFixture[str]) -> None:
    stub = LlamaCppStub(ByteTokenizer())
    with stub.run() as url:
        assert run(tmp_path, suite, url, "ids", "send=ids") == 2
    assert "text only" in capsys.readouterr().err and stub.bodies == []


@pytest.mark.parametrize("n_ctx, stream, message", [
    (605, "true", "after 5 of max_tokens 12"),  # prompt + max_tokens over n_ctx: the answer is cut
    (605, "false", "after 5 of max_tokens 12"),
    (500, "true", "maximum context length is 500"),  # a prompt over n_ctx: empty stream, the 400 explains it
    (500, "false", "maximum context length is 500"),
])
def test_prompts_that_do_not_fit_the_server_context_are_error_rows(tmp_path: Path, suite: str, n_ctx: int,
                                                                   stream: str, message: str) -> None:
    with LlamaCppStub(ByteTokenizer(), n_ctx=n_ctx).run() as url:
        assert run(tmp_path, suite, url, "ctx", f"stream={stream}") == 3
        assert run(tmp_path, suite, url, "ctx-ok", f"stream={stream}", args=("--max-error-rate", "1")) == 0
    df = rows(tmp_path, "ctx")
    bad = df[df["context_length"] == 600]
    assert (bad["status"] == "error").all() and bad["error"].str.contains(message).all()
    assert (df.loc[df["context_length"] < 600, "status"] == "ok").all()
    assert manifest(tmp_path, "ctx")["status"] == "complete_with_errors"
    assert manifest(tmp_path, "ctx-ok")["status"] == "complete"


def test_a_run_where_every_request_fails_is_not_green(tmp_path: Path, suite: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    opts = ("server=openai", "model=m", "retries=0")
    with StubServer([Reply(500, {"error": {"message": "engine crashed"}})]).run() as url:
        assert run(tmp_path, suite, url, "500s", *opts) == 3
    assert rows(tmp_path, "500s")["error"].str.contains("engine crashed").all()
    err = capsys.readouterr().err
    assert "16 of 16 samples are error rows" in err
    assert "Error: HTTP 500 from" in err and "engine crashed" in err  # the cause on screen, not only in the parquet
    refused = f"http://127.0.0.1:{free_port()}/v1"
    assert run(tmp_path, suite, refused, "refused", *opts) == 3
    assert run(tmp_path, suite, refused, "refused-auto", "retries=0") == 2  # nothing to recognise: stop at once
    hang = StubServer([Reply(body=completion(), delay_s=2.0)])
    with hang.run() as url:
        assert run(tmp_path, suite, url, "hang", *opts, "timeout_s=0.2", args=("--lengths", "400")) == 3
    assert rows(tmp_path, "hang")["error"].str.contains("timed out").all()


def test_non_string_text_costs_rows_not_the_run_and_is_retried_on_resume(tmp_path: Path, suite: str) -> None:
    def answer(body: dict[str, Any]) -> dict[str, Any]:
        d = completion(oracle_answer(body["prompt"]), prompt_tokens=len(body["prompt"].encode()) + 1)
        if state["broken"]:
            d["choices"][0]["text"] = 12345  # a number where the text belongs
        return d

    state = {"broken": True}
    opts = ("server=openai", "model=m", "stream=false")
    with StubServer([Reply(body=answer)]).run() as url:
        assert run(tmp_path, suite, url, "odd", *opts) == 3
        df = rows(tmp_path, "odd")
        assert (df["status"] == "error").all() and df["error"].str.contains("not a string").all()
        state["broken"] = False
        assert run(tmp_path, suite, url, "odd", *opts) == 0  # the same command retries the error rows
    assert (rows(tmp_path, "odd")["score"] == 1.0).all()


def test_max_error_rate_threshold(tmp_path: Path, suite: str, capsys: pytest.CaptureFixture[str]) -> None:
    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.fake import FakeBackend
    from evalctx.serve import make_server

    tok = ByteTokenizer()
    fake = FakeBackend(parse_options(FakeBackend, {"fail_every": 4}), BackendContext(tokenizer=tok))
    with serving(make_server(fake, tok, "fake", port=0, quiet=True)) as url:
        assert run(tmp_path, suite, url, "within", "retries=0", args=("--max-error-rate", "0.5")) == 0
    assert manifest(tmp_path, "within")["status"] == "complete"
    assert 0 < manifest(tmp_path, "within")["error_rate"] <= 0.5
    err = capsys.readouterr().err
    assert "error rows" in err and "Error: " in err and "injected" in err  # still said, though within the threshold
    assert main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--max-error-rate", "1.5"]) == 2


# --- context limits the server states, and a context it says it shifted (issue 22) --------------------------------

SHIFT_SUITE = """
name = "shift"
[[tasks]]
task = "passkey"
lengths = [500, 1020]
depths = [0.0, 1.0]
samples = 2
max_new_tokens = 8
"""


@pytest.fixture
def shift_suite(tmp_path: Path) -> str:
    path = tmp_path / "shift.toml"
    path.write_text(SHIFT_SUITE)
    return str(path)


def test_a_context_the_server_states_in_props_makes_longer_samples_unsupported(tmp_path: Path,
                                                                               shift_suite: str) -> None:
    """llama.cpp with context shift and n_ctx 1024: 1020-token prompts + 8 answer tokens used to come back ok and
    wrong (half the context dropped). /props states n_ctx: those samples are unsupported before anything is sent."""
    stub = LlamaCppStub(ByteTokenizer(), n_ctx=1024)
    stub.context_shift = True
    stub.props = {"default_generation_settings": {"n_ctx": 1024}, "model_path": "/models/tiny.gguf"}
    with stub.run() as url:
        assert run(tmp_path, shift_suite, url, "props") == 0
    df = rows(tmp_path, "props").set_index("context_length")
    assert (df.loc[500, "status"] == "ok").all() and (df.loc[500, "score"] == 1).all()
    assert (df.loc[1020, "status"] == "unsupported").all()
    assert df.loc[1020, "error"].iloc[0] == ("context_length + max_new_tokens = 1028 exceeds the server's n_ctx "
                                             "(/props) 1024")
    assert not any(len(b["prompt"]) > 1000 for b in stub.bodies)  # never sent
    assert manifest(tmp_path, "props")["identity"]["props.n_ctx"] == 1024


def test_an_answer_the_server_marks_truncated_is_an_error_row(tmp_path: Path, shift_suite: str) -> None:
    stub = LlamaCppStub(ByteTokenizer(), n_ctx=1024)
    stub.context_shift = stub.report_truncation = True
    with stub.run() as url:
        assert run(tmp_path, shift_suite, url, "trunc", "stream=false", "retries=0") == 3
    df = rows(tmp_path, "trunc").set_index("context_length")
    assert (df.loc[500, "status"] == "ok").all()
    assert (df.loc[1020, "status"] == "error").all()
    assert df.loc[1020, "error"].iloc[0].startswith("the server cut or shifted the context to make room")

"""hf ``prefix_reuse``: the KV cache keeps the previous prompt's shared prefix in whole chunks, the logits are a cold
prefill's bit for bit, and a depth sweep through the runner answers as without reuse, raw and chat, resumed too.
Under mpirun with tp=2: tests/test_hf_tp.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evalctx.backends.base import BackendContext, parse_options  # noqa: E402
from evalctx.backends.hf import HFBackend  # noqa: E402
from evalctx.cli import main  # noqa: E402
from evalctx.errors import UsageError  # noqa: E402
from evalctx.records import GenerationRequest  # noqa: E402
from evalctx.models.tokenizer import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()
HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 3


def make_backend(path: Path, **opts: object) -> HFBackend:
    options = parse_options(HFBackend, {"device": "cpu", "chunk_size": 16, **opts})
    return HFBackend(options, BackendContext(model=str(path), tokenizer=TOK))


def req(text: str, i: int = 0) -> GenerationRequest:
    return GenerationRequest(sample_id=str(i), prompt_ids=TOK.encode(text, True), prompt=text, max_new_tokens=6)


def capture_prefill_logits(backend: HFBackend) -> list[Any]:
    """The logits of every forward call the backend makes with more than one token (prefill chunks)."""
    seen: list[Any] = []
    forward = backend.model.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        if kwargs["input_ids"].shape[1] > 1:
            seen.append(out.logits.clone())
        return out

    backend.model.forward = recording
    return seen


def needle(key: str, at: int) -> str:
    return HAYSTACK[:at] + f" The pass key is {key}. " + HAYSTACK[at:] + " What is the pass key? The pass key is"


def test_reused_prefix_gives_the_cold_logits_bit_for_bit(tiny_llama: Path) -> None:
    first, second = needle("71234", 200), needle("99881", 150)  # the later prompt's needle comes earlier
    shared = next(i for i, (a, b) in enumerate(zip(TOK.encode(first, True), TOK.encode(second, True))) if a != b)
    warm = make_backend(tiny_llama, prefix_reuse=True)
    assert warm.generate([req(first)])[0].n_cached_prompt_tokens == 0
    logits = capture_prefill_logits(warm)
    got = warm.generate([req(second)])[0]
    assert got.n_cached_prompt_tokens == shared // 16 * 16 > 0  # whole chunks of the shared prefix
    cold = make_backend(tiny_llama)
    cold_logits = capture_prefill_logits(cold)
    want = cold.generate([req(second)])[0]
    assert want.n_cached_prompt_tokens == 0
    assert torch.equal(logits[-1], cold_logits[-1])  # same chunks, same keys: the same numbers
    assert len(logits) == len(cold_logits) - shared // 16
    assert (got.text, got.n_output_tokens, got.finish_reason) == (want.text, want.n_output_tokens,
                                                                  want.finish_reason)


def test_reuse_stops_short_of_the_last_token_and_of_a_partial_chunk(tiny_llama: Path) -> None:
    backend = make_backend(tiny_llama, prefix_reuse=True)
    text = needle("31415", 100)
    n = len(TOK.encode(text, True))
    backend.generate([req(text)])
    again = backend.generate([req(text)])[0]
    assert again.n_cached_prompt_tokens == (n - 1) // 16 * 16  # the last token is always computed
    other = "Q" + text[1:]  # differs at the first text token (the BOS is shared: less than a chunk)
    assert backend.generate([req(other)])[0].n_cached_prompt_tokens == 0
    off = make_backend(tiny_llama)
    off.generate([req(text)])
    assert off.generate([req(text)])[0].n_cached_prompt_tokens == 0  # without prefix_reuse: always cold


def test_batch_rows_share_their_shortest_prefix(tiny_llama: Path) -> None:
    backend = make_backend(tiny_llama, prefix_reuse=True)
    a, b = needle("11111", 60), needle("22222", 200)
    c, d = needle("33333", 200), needle("44444", 240)  # c shares 60 chars with a; d shares 200 with b
    backend.generate([req(a, 0), req(b, 1)])
    rows = backend.generate([req(c, 0), req(d, 1)])
    ids = [TOK.encode(x, True) for x in (a, b, c, d)]
    lcp = [next(i for i, (x, y) in enumerate(zip(p, q)) if x != y) for p, q in ((ids[0], ids[2]), (ids[1], ids[3]))]
    assert {r.n_cached_prompt_tokens for r in rows} == {min(lcp) // 16 * 16}
    assert [r.text for r in rows] == [r.text for r in make_backend(tiny_llama).generate([req(c, 0), req(d, 1)])]
    assert backend.generate([req(c)])[0].n_cached_prompt_tokens == 0  # another batch size: a new cache


def test_prefix_reuse_needs_chunks(tiny_llama: Path) -> None:
    with pytest.raises(UsageError, match="prefix_reuse reuses whole prefill chunks: set chunk_size > 0"):
        make_backend(tiny_llama, chunk_size=0, prefix_reuse=True)
    assert make_backend(tiny_llama, prefix_reuse=True).row_columns()["hf_prefix_reuse"] is True


SWEEP = """
name = "sweep"
prompt_mode = "{mode}"
[[tasks]]
task = "passkey"
lengths = [400]
depths = {{ linear = 5 }}
samples = 1
"""
ANSWER = ["completion", "score", "status", "n_output_tokens", "finish_reason", "prompt_sha1"]


def _run(tmp: Path, run_id: str, mode: str, reuse: bool) -> pd.DataFrame:
    (tmp / "s.toml").write_text(SWEEP.format(mode=mode))
    code = main(["run", "--suite", str(tmp / "s.toml"), "--backend", "hf", "--model", "tiny", "--out", str(tmp),
                 "--run-id", run_id, "--no-progress", "--backend-opt", "chunk_size=32",
                 "--backend-opt", f"prefix_reuse={str(reuse).lower()}"])
    assert code == 0
    return pd.read_parquet(tmp / run_id / "results.parquet").set_index("sample_id").sort_index()


@pytest.mark.parametrize("mode", ["raw", "chat"])
def test_depth_sweep_answers_as_without_reuse_and_resumes_exactly(tmp_path: Path, mode: str) -> None:
    cold = _run(tmp_path, "cold", mode, reuse=False)
    warm = _run(tmp_path, "warm", mode, reuse=True)
    assert (cold["status"] == "ok").all()
    pd.testing.assert_frame_equal(cold[ANSWER], warm[ANSWER])
    assert (cold["n_cached_prompt_tokens"] == 0).all()
    cached = warm["n_cached_prompt_tokens"]
    assert (cached % 32 == 0).all() and (cached > 0).sum() >= 3 and (cached == 0).any()
    summary = pd.read_csv(tmp_path / "warm" / "summary.csv")
    assert summary["n_warm"].sum() == (cached > 0).sum()
    assert summary.loc[summary["n_warm"] > 0, "ttft_s_p50"].isna().all()  # one sample a cell: no cold timing
    # Resume: drop every other journaled row; the rerun builds the same ids and prompts and runs the rest in
    # another company (another first prompt, other neighbours), with the same answers.
    journal = tmp_path / "warm" / "journal" / "replica-0.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[::2]))
    (tmp_path / "warm" / "results.parquet").unlink()
    resumed = _run(tmp_path, "warm", mode, reuse=True)
    pd.testing.assert_frame_equal(cold[ANSWER], resumed[ANSWER])
    again = [json.loads(x)["sample_id"] for x in journal.read_text().splitlines()[len(lines[::2]):]]
    assert sorted(again) == sorted(json.loads(x)["sample_id"] for x in lines[1::2])  # only the dropped ones ran

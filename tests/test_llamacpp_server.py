"""The http backend against a real OpenAI-compatible server nobody on this project wrote: llama-cpp-python's server
(llama.cpp) serving the embedded tiny model, compared with the hf backend sample by sample.

Marker ``llamacpp`` (not in the default run): building the server takes 9 to 21 minutes on 2 cores the first time
(see tests/llamacpp_server.py for the cache and the settings). ``EVALCTX_LLAMACPP_SAMPLES`` samples per cell of the
default suite (256..4096 tokens, 2 tasks x 5 lengths x 5 depths): 1 gives 50 per mode, 4 gives the issue's 200.
The agreement table is printed and written to ``$EVALCTX_LLAMACPP_OUT/agreement.md`` when that is set.

    EVALCTX_LLAMACPP_SAMPLES=4 pytest -m llamacpp -s tests/test_llamacpp_server.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from evalctx.cli import main

pytestmark = pytest.mark.llamacpp

SAMPLES = int(os.environ.get("EVALCTX_LLAMACPP_SAMPLES", "1"))
N_CTX = 4352  # 4096-token prompts + their answers; a multiple of 256 (see llamacpp_server.serve)
NEAR_TIE = 0.01
"""Largest top-1 minus top-2 logit (hf, float32) at the first differing token for a difference to count as a
near-tie: float32 sums in another order (llama.cpp's kernels vs torch's) move logits by ~1e-4."""
TABLE: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The run folder; when the module's tests are done, the agreement table of the modes that ran is printed (and
    written): the numbers docs/http.md quotes."""
    yield tmp_path_factory.mktemp("llamacpp")
    cols = ["mode", "samples", "ok", "prompt counts equal", "answers identical", "correct (hf / server)",
            "differences"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in TABLE:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = os.environ.get("EVALCTX_LLAMACPP_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "agreement.md").write_text(text)


@pytest.fixture(scope="module")
def server(work: Path) -> Any:
    from llamacpp_server import serve

    with serve(N_CTX, work / "server.log") as url:
        yield url


def run(work: Path, run_id: str, *args: str) -> int:
    return main(["run", "--suite", "default", "--samples", str(SAMPLES), "--out", str(work), "--run-id", run_id,
                 "--no-progress", *args])


def http(work: Path, url: str, run_id: str, *args: str, opts: tuple[str, ...] = ()) -> int:
    flags = [x for o in (f"base_url={url}", *opts) for x in ("--backend-opt", o)]
    return run(work, run_id, "--backend", "http", "--tokenizer", "tiny", *flags, *args)


def results(work: Path, run_id: str) -> pd.DataFrame:
    return pd.read_parquet(work / run_id / "results.parquet").set_index("sample_id").sort_index()


@pytest.fixture(scope="module")
def hf(work: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for mode in ("raw", "chat"):
        assert run(work, f"hf-{mode}", "--backend", "hf", "--model", "tiny", "--prompt-mode", mode) == 0
        out[mode] = results(work, f"hf-{mode}")
    return out


class Margins:
    """hf's top-1 minus top-2 logit at the first token where two answers part (the tiny model, float32, CPU)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.model: Any = None
        self.samples: dict[str, dict[str, Any]] = {}

    def __call__(self, mode: str, sample_id: str, a: str, b: str) -> float:
        import torch
        from transformers import AutoModelForCausalLM

        from evalctx.models.embedded import resolve_model
        from evalctx.models.tokenizer import load_tokenizer

        if mode not in self.samples:
            path = self.work / f"samples-{mode}.jsonl"
            assert main(["generate", "--suite", "default", "--tokenizer", "tiny", "--samples", str(SAMPLES),
                         "--prompt-mode", mode, "--with-ids", "--out", str(path)]) == 0
            self.samples[mode] = {d["id"]: d for d in map(json.loads, path.read_text().splitlines())}
        if self.model is None:
            self.model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny").path, torch_dtype=torch.float32)
            self.tok = load_tokenizer("tiny")
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        ids = self.samples[mode][sample_id]["prompt_ids"] + self.tok.encode(a[:n], add_special_tokens=False)
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        return float(top[0] - top[1])


@pytest.fixture(scope="module")
def margins(work: Path) -> Margins:
    return Margins(work)


def agreement(name: str, mode: str, ref: pd.DataFrame, got: pd.DataFrame, margins: Margins) -> dict[str, Any]:
    """Counts for the table: prompt lengths the server verified, identical answers, and each difference with
    hf's logit margin where the answers part."""
    assert list(got.index) == list(ref.index)
    ok = got["status"] == "ok"
    same = ok & (got["completion"] == ref["completion"])
    diffs, tie = [], []
    for sid in got.index[ok & ~same]:
        tie.append(margins(mode, sid, ref.at[sid, "completion"], got.at[sid, "completion"]))
        diffs.append(f"{got.at[sid, 'task']} {got.at[sid, 'context_length']} @{got.at[sid, 'depth']:g}: hf "
                     f"{ref.at[sid, 'completion']!r} vs server {got.at[sid, 'completion']!r} (margin {tie[-1]:.4f})")
    row = {"mode": name, "samples": len(got), "ok": int(ok.sum()),
           "prompt counts equal": int((got["n_prompt_tokens"] == got["context_length"]).sum()),
           "answers identical": int(same.sum()),
           "correct (hf / server)": f"{int((ref['score'] == 1).sum())} / {int((got['score'] == 1).sum())}",
           "differences": "; ".join(diffs) or "none", "_margins": tie}
    TABLE.append(row)
    return row


def assert_agrees(row: dict[str, Any]) -> None:
    n = row["samples"]
    assert row["ok"] == n and row["prompt counts equal"] == n
    assert n - row["answers identical"] <= max(1, n // 200), row["differences"]
    assert all(m < NEAR_TIE for m in row["_margins"]), row["differences"]


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, mode, args, opts", [
    ("raw, stream=false, batch 1", "raw", (), ("stream=false",)),
    ("raw, streaming, --batch-size 4", "raw", ("--batch-size", "4"), ()),
    ("chat (endpoint=completions), streaming, --batch-size 4", "chat", ("--prompt-mode", "chat", "--batch-size", "4"),
     ()),
])
def test_agrees_with_hf_sample_by_sample(work: Path, server: str, hf: dict[str, pd.DataFrame], margins: Margins,
                                         name: str, mode: str, args: tuple[str, ...], opts: tuple[str, ...]) -> None:
    run_id = "http-" + name.split(",")[0].split()[0] + "-" + ("stream" if "streaming" in name else "json")
    assert http(work, server, run_id, *args, opts=opts) == 0
    got = results(work, run_id)
    m = json.loads((work / run_id / "manifest.json").read_text())
    assert m["label"] == Path(m["backend"]["model"]).name and m["backend"]["server"]["preset"] == "llamacpp"
    assert m["backend"]["sampling"]["repeat_penalty"] == 1.0 and m["backend"]["server"]["version"] == "0.3.36"
    assert got["n_output_tokens"].notna().all()
    assert_agrees(agreement(name, mode, hf[mode], got, margins))


def test_without_the_preset_decoding_is_not_greedy(work: Path, server: str, hf: dict[str, pd.DataFrame],
                                                   margins: Margins) -> None:
    """server=openai sends no repeat_penalty: llama.cpp's default 1.1 changes answers at temperature 0."""
    assert http(work, server, "http-openai", "--batch-size", "4", opts=("server=openai",)) == 0
    row = agreement("raw, server=openai (no repeat_penalty)", "raw", hf["raw"], results(work, "http-openai"),
                    margins)
    assert row["answers identical"] < row["samples"] - max(1, row["samples"] // 200)


@pytest.mark.parametrize("opts, args, message", [
    (("endpoint=chat",), ("--prompt-mode", "chat"), "continue_final_message"),
    (("send=ids",), (), "takes the prompt as text only"),
])
def test_modes_the_server_cannot_do_stop_with_one_line(work: Path, server: str, capsys: pytest.CaptureFixture[str],
                                                       opts: tuple[str, ...], args: tuple[str, ...],
                                                       message: str) -> None:
    assert http(work, server, "stop-" + opts[0].split("=")[1], *args, opts=opts) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    TABLE.append({"mode": ", ".join(opts + args), "samples": "-", "differences": f"exit 2: {err[0]}"})


def test_prompts_over_the_server_context_are_error_rows(work: Path) -> None:
    from llamacpp_server import serve

    with serve(1024, work / "server-1024.log") as url:
        for stream in ("true", "false"):
            run_id = f"ctx-{stream}"
            assert http(work, url, run_id, "--lengths", "256", "1020", "2048", opts=(f"stream={stream}",)) == 3
            df = results(work, run_id)
            assert (df.loc[df["context_length"] == 256, "status"] == "ok").all()
            cut = df[df["context_length"] == 1020]
            assert (cut["status"] == "error").all() and cut["error"].str.contains("finish_reason length").all()
            over = df[df["context_length"] == 2048]
            assert (over["status"] == "error").all()
            assert over["error"].str.contains("maximum context length is 1024 tokens").all()
    TABLE.append({"mode": "n_ctx 1024: lengths 256, 1020 (+ max_new_tokens over), 2048 (over)", "samples": len(df),
                  "differences": f"exit 3; 1020: {cut['error'].iloc[0]} | 2048: {over['error'].iloc[0]}"})

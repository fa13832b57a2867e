"""The http backend against a second real server: Hugging Face's ``transformers serve`` (the ``serving`` extra of
transformers, FastAPI + Uvicorn, no build) serving the embedded tiny model on CPU, in the default test run.

Raw prompts agree with the hf backend sample by sample (completion, prompt count, output count, finish reason);
the server is recognised (``server=transformers``: OpenAI's fields only, its EOS counting mapped); a model whose
generation config samples, served with ``--continuous-batching``, is stopped by the greedy check before any row.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
from http_helpers import free_port

from evalctx.cli import main
from evalctx.models.embedded import resolve_model

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SUITE = """
name = "tserve"
[[tasks]]
task = "passkey"
lengths = [300, 700]
depths = [0.0, 0.5, 1.0]
samples = 2
max_new_tokens = 8
[[tasks]]
task = "niah_single"
lengths = [500]
depths = [0.25, 1.0]
samples = 2
max_new_tokens = 12
"""
COLUMNS = ["completion", "n_prompt_tokens", "n_output_tokens", "finish_reason", "score", "status"]


@contextlib.contextmanager
def transformers_serve(model: Path, log: Path, *flags: str) -> Iterator[str]:
    """``transformers serve MODEL`` on a free loopback port (CPU, offline); yields the /v1 base URL."""
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    cmd = [str(exe) if exe.exists() else "transformers", "serve", str(model), "--host", "127.0.0.1", "--port",
           str(port), "--device", "cpu", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read())["data"]:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"transformers serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run(tmp: Path, run_id: str, *args: str) -> int:
    (tmp / "s.toml").write_text(SUITE)
    return main(["run", "--suite", str(tmp / "s.toml"), "--tokenizer", "tiny", "--out", str(tmp), "--run-id", run_id,
                 "--no-progress", *args])


def _table(tmp: Path, run_id: str) -> pd.DataFrame:
    return pd.read_parquet(tmp / run_id / "results.parquet").set_index("sample_id").sort_index()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tserve")


def test_raw_prompts_agree_with_the_hf_backend_sample_by_sample(work: Path) -> None:
    tiny = resolve_model("tiny").path
    assert _run(work, "hf", "--backend", "hf", "--model", "tiny") == 0
    base = _table(work, "hf")
    with transformers_serve(tiny, work / "serve.log") as url:
        for run_id, stream in (("ts-stream", "true"), ("ts-plain", "false")):
            assert _run(work, run_id, "--backend", "http", "--backend-opt", f"base_url={url}", "--backend-opt",
                        f"model={tiny}", "--backend-opt", f"stream={stream}") == 0
            got = _table(work, run_id)
            pd.testing.assert_frame_equal(base[COLUMNS], got[COLUMNS], check_dtype=False)
            manifest = json.loads((work / run_id / "manifest.json").read_text())
            assert manifest["backend"]["server"]["preset"] == "transformers"
            assert manifest["backend"]["sampling"] == {"temperature": 0.0, "frequency_penalty": 0.0,
                                                       "presence_penalty": 0.0}
    # answer + EOS filling max_tokens exactly: the server says "length" and counts the EOS; the row says "stop"
    assert (base["finish_reason"] == "stop").any()


def test_a_server_that_samples_is_stopped_before_any_row(work: Path, capsys) -> None:
    """The issue's silent wrong score: the model's generation_config samples (Llama-3.x-Instruct's shape:
    do_sample true, no top_k) and ``--continuous-batching`` drops the request's greedy settings."""
    model = work / "sampling"
    shutil.copytree(resolve_model("tiny").path, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 1.0}))
    with transformers_serve(model, work / "serve-cb.log", "--continuous-batching", "--cb-num-blocks", "64") as url:
        capsys.readouterr()
        args = ["--backend", "http", "--backend-opt", f"base_url={url}", "--backend-opt", f"model={model}"]
        assert _run(work, "sampled", *args) == 2
        err = capsys.readouterr().err
        assert "does not decode greedily" in err and "do_sample: true" in err
        assert not (work / "sampled" / "results.parquet").exists()

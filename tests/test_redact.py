"""Which option names hold secrets: values of secrets are masked everywhere, everything else stays readable."""

from __future__ import annotations

import pytest

from evalctx.redact import is_secret_key


@pytest.mark.parametrize("key", ["api_key", "OPENAI_API_KEY", "hf_token", "token", "client_secret", "password",
                                 "--api-key", "auth", "credentials", "access_key"])
def test_secret_names_are_masked(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_new_tokens", "tokenizer", "key_digits", "seconds_per_token", "eos_token",
                                 "pad_token", "sink_token_length", "tokens_per_block", "key_type"])
def test_ordinary_names_are_not(key: str) -> None:
    # seconds_per_token (the fake backend's rate) was shown as *** in reports before.
    assert not is_secret_key(key)


def test_a_key_the_server_quotes_back_is_masked_everywhere(tmp_path, capsys, monkeypatch) -> None:
    """A 401 that quotes the API key ({"error": "invalid key sk-SECRET123"}): the key reached the journal,
    results.parquet, the report and stderr verbatim (issue 23, kind 1)."""
    import json as _json

    import pandas as pd
    from http_helpers import Reply, StubServer

    from evalctx.cli import main

    key = "sk-SECRET123456"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    (tmp_path / "s.toml").write_text('name = "k"\n[[tasks]]\ntask = "passkey"\nlengths = [300]\ndepths = [0.0]\n'
                                     'samples = 2\nmax_new_tokens = 8\n')
    with StubServer([Reply(401, {"error": f"invalid key {key}"})]).run() as url:
        code = main(["run", "--suite", str(tmp_path / "s.toml"), "--backend", "http", "--tokenizer", "byte",
                     "--out", str(tmp_path), "--run-id", "k", "--no-progress", "--backend-opt", f"base_url={url}",
                     "--backend-opt", "verify_greedy=false"])
    assert code == 3
    err = capsys.readouterr().err
    assert key not in err and "invalid key ***" in err
    df = pd.read_parquet(tmp_path / "k" / "results.parquet")
    assert df["error"].str.contains("invalid key \\*\\*\\*").all()
    for f in (tmp_path / "k").rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    assert main(["report", str(tmp_path / "k")]) == 0
    for f in (tmp_path / "k").rglob("report*"):
        assert key not in f.read_text()
    _json.loads((tmp_path / "k" / "manifest.json").read_text())

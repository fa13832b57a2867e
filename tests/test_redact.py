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

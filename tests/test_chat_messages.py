"""Chat-mode samples carry the messages their prompt renders, for servers that apply the template themselves."""

from __future__ import annotations

import pytest

from evalctx.tasks import get_task
from evalctx.models.tokenizer import ByteTokenizer


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multiquery"])
def test_messages_render_back_to_the_exact_prompt(task: str) -> None:
    tok = ByteTokenizer(chat=True)
    sample = get_task(task)(tok, {}, "chat").make_sample(900, 0.5, 7)
    assert sample.messages is not None
    user, assistant = sample.messages
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert tok.apply_chat_template([user]) + assistant["content"] == sample.prompt
    assert "messages" not in sample.to_json()


def test_raw_samples_have_no_messages() -> None:
    sample = get_task("passkey")(ByteTokenizer(), {}, "raw").make_sample(400, 0.5, 1)
    assert sample.messages is None

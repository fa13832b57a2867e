"""The embedded tiny Llama: loads offline, answers a real passkey prompt, stays small, and its recipe runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "evalctx" / "data" / "models" / "tiny"
VARIANT = REPO / "evalctx" / "data" / "models" / "tiny-rope-linear"
MAX_BYTES = 10 * 1024 * 1024

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _greedy(model, ids: list[int], max_new: int) -> list[int]:
    eos = model.generation_config.eos_token_id
    out = []
    x = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(max_new):
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(TINY), local_files_only=True, dtype=torch.float32).eval()
    return tok, model


def test_files_present_and_small():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "TRAINING.md"):
        assert (TINY / name).is_file(), name
    total = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"tiny model is {total} bytes"


def test_config_is_plain_llama(tiny):
    tok, model = tiny
    cfg = json.loads((TINY / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert "auto_map" not in cfg  # no custom code
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64 and cfg["head_dim"] == 64
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 10000.0
    assert cfg["max_position_embeddings"] >= 1 << 20
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.is_fast and tok("hi").input_ids[0] == tok.bos_token_id


def test_digits_one_per_token_and_chat_template(tiny):
    tok, _ = tiny
    pieces = tok.convert_ids_to_tokens(tok(" 1234567.", add_special_tokens=False).input_ids)
    assert [p for p in pieces if p.isdigit()] == list("1234567")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the pass key?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith(tok.bos_token) and text.endswith("<|assistant|>\n")
    assert tok.convert_tokens_to_ids("<|assistant|>") != tok.unk_token_id


def test_answers_a_real_passkey_prompt(tiny):
    from evalctx.tasks.scoring import first_int_match
    from evalctx.tasks import get_task
    from evalctx.models.tokenizer import HFTokenizer

    _, model = tiny
    tok = HFTokenizer(TINY)
    task = get_task("passkey")(tok, {}, "raw")
    for seed, depth in ((1, 0.5), (2, 0.0)):
        s = task.make_sample(256, depth, seed)
        assert len(s.prompt_ids) == 256
        completion = tok.decode(_greedy(model, s.prompt_ids, 8))
        assert first_int_match(completion, s.target).value == 1.0, (completion, s.target)


def test_rope_linear_variant_is_the_same_model_rescaled():
    if not VARIANT.is_dir():
        pytest.skip("no tiny-rope-linear variant shipped")
    a = json.loads((TINY / "config.json").read_text())
    b = json.loads((VARIANT / "config.json").read_text())
    assert b["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert {k: v for k, v in a.items() if not k.startswith("rope")} == \
        {k: v for k, v in b.items() if not k.startswith("rope")}
    assert (VARIANT / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()


def _train(tmp_path: Path, *extra: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "tiny"
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(REPO / "scripts" / "train_tiny.py"), "--out", str(out), "--device", "cpu",
           "--threads", "1", "--log-every", "1", *extra]
    subprocess.run(cmd, check=True, env=env, cwd=str(tmp_path), timeout=300)
    return out


def test_train_script_smoke(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _train(tmp_path, "--steps", "3", "--max-len", "160", "--batch-tokens", "512", "--corpus-samples", "20",
                 "--vocab-size", "600")
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and len(log["log"]) == 3
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.config.vocab_size == len(tok) and model.config.head_dim == 64


@pytest.mark.slow
def test_train_script_is_deterministic(tmp_path):
    args = ("--steps", "4", "--max-len", "160", "--batch-tokens", "512", "--corpus-samples", "20",
            "--vocab-size", "600")
    a = _train(tmp_path / "a", *args)
    b = _train(tmp_path / "b", *args)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_tiny_retrieves_at_short_lengths_on_every_haystack():
    sys.path.insert(0, str(REPO / "scripts"))
    import eval_tiny

    res = eval_tiny.evaluate(TINY, list(eval_tiny.VARIANTS), ["raw"], [512], [0.0, 0.5, 1.0], 3, "cpu", "float32",
                             0, 16, log=False)
    for cell in res["cells"]:
        assert cell["accuracy"] >= 2 / 3, cell

"""``shape = "upstream"``: passkey and kv_retrieval prompts byte for byte as upstream builds them.

The upstream construction is reimplemented here from its source, read through the code index:

* NVIDIA/TensorRT-LLM ``examples/infinitebench/construct_synthetic_dataset.py`` at commit
  a17b14f6d89b5ac7d61152b17f727651a7bcc607 (``build_passkey``: ``num_noise``/``step`` per ``--test_level`` 0..7,
  ``random.seed(args.random_seed)``, five ``random.randint(0, 9)`` digits; ``build_kv_retrieval``: ``nnoise =
  [928, 2500]`` for ``[64 * 1024, 128 * 1024]``, ``ans_id = min(int(cnt * nnoise / nsample), nnoise)``, the
  ``text``/``question`` strings);
* NVIDIA/TensorRT-LLM ``examples/infinitebench/eval_utils.py`` at commit f430a4b447ef4cba22698902d43eae0debf08594
  (``create_prompt``'s two templates);
* OpenBMB/InfiniteBench ``data/construct_synthetic_dataset.py`` at commit 89b7855365b35d5f4be30fa5560ec783287fbb54
  (the same noise, answer and question strings TensorRT-LLM copied).
"""

from __future__ import annotations

import random
import re

import pytest

from evalctx.errors import UsageError
from evalctx.tasks import get_task
from evalctx.tasks.kv_retrieval import upstream_pairs
from evalctx.tasks.passkey import UPSTREAM_LEVELS, upstream_noise_lines, upstream_prompt
from evalctx.models.tokenizer import ByteTokenizer

# --- upstream, reimplemented (see the module docstring for the source) ------------------------------------------
NUM_NOISE = [326, 652, 1305, 2610, 5220, 10440, 20880, 41760]
STEP = [6, 12, 22, 45, 90, 180, 360, 720]
KV_LEVELS, NNOISE = [64 * 1024, 128 * 1024], [928, 2500]  # TensorRT-LLM's build_kv_retrieval (OpenBMB's: 928, 1855)
TEMPLATES = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
               "you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n"
                    "{input}",
}


def create_prompt(eg: dict, data_name: str) -> str:
    return TEMPLATES[data_name].format(context=eg["context"], input=eg["input"])


def build_passkey(test_level: int, random_seed: int = 0) -> list[dict]:
    random.seed(random_seed)
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    answer = "The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "What is the pass key?"
    step_i, num_noise_i = STEP[test_level], NUM_NOISE[test_level]
    ret = []
    for j in range(0, num_noise_i + 1, step_i):
        input_text = noise * j + answer + noise * (num_noise_i - j)
        for _ in range(5):
            key_t = "".join(str(random.randint(0, 9)) for _ in range(5))
            ret.append({"input": question, "context": input_text.replace("{key}", key_t), "answer": key_t,
                        "len": 26 * (num_noise_i - j), "j": j})
    return ret


def build_kv_retrieval_one(records: list[list[str]], cnt: int, nnoise: int, nsample: int = 500) -> dict:
    """One row of build_kv_retrieval for one record list, already in its shuffled order."""
    ans_id = min(int(cnt * nnoise / nsample), nnoise)
    text = "JSON data:\n{"
    t = -1
    for item in records:
        t += 1
        if t == nnoise:
            break
        text += "\"" + item[0] + "\": \"" + item[1] + "\", "
    text = text[:-2] + '}'
    question = "\nKey: \"" + records[ans_id][0] + "\"\nThe value associated with the specified key is: "
    return {"id": cnt, "context": text, "input": question, "answer": records[ans_id][1]}


# --- passkey ---------------------------------------------------------------------------------------------------
def test_the_line_counts_are_upstreams_at_every_level():
    assert [upstream_noise_lines(8192 << k) for k in range(8)] == NUM_NOISE
    # the rate alone reproduces the table, so lengths between levels follow the same rule
    assert all(n * 1305 // 32768 == lines for n, lines in UPSTREAM_LEVELS.items())


@pytest.mark.parametrize("level", [0, 1])
def test_every_upstream_passkey_prompt_is_reproduced_byte_for_byte(level):
    rows = build_passkey(level)
    assert len(rows) == 5 * len(range(0, NUM_NOISE[level] + 1, STEP[level]))
    for eg in rows:
        assert upstream_prompt(NUM_NOISE[level], eg["j"], eg["answer"]) == create_prompt(eg, "passkey")


@pytest.mark.parametrize("length, level", [(8192, 0), (32768, 2)])
def test_the_task_builds_the_upstream_prompt_and_records_its_own_length(length, level):
    tok = ByteTokenizer()
    task = get_task("passkey")(tok, {"shape": "upstream"})
    lines = NUM_NOISE[level]
    for depth in (0.0, 0.25, 0.5, 1.0):
        s = task.make_sample(length, depth, seed=7)
        j = s.meta["needle_line"]
        assert j == round(depth * lines) and s.meta["noise_lines"] == lines and s.meta["asked_length"] == length
        eg = {"context": None, "input": "What is the pass key?"}
        eg["context"] = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
                         * j + f"The pass key is {s.target[0]}. Remember it. {s.target[0]} is the pass key.\n"
                         + "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
                         "again.\n" * (lines - j))
        assert s.prompt == create_prompt(eg, "passkey")
        # the count is recorded, never forced: whole lines make what they make
        assert s.meta["prompt_tokens"] == len(s.prompt_ids) == len(tok.encode(s.prompt, add_special_tokens=True))
        assert s.meta["prompt_tokens"] != length and s.meta["shape"] == "upstream"
        assert s.context_length == length  # the level: one table row per asked length
        assert s.prompt[s.needle_token_index - 1:].startswith("The pass key is")  # ByteTokenizer: BOS, then 1 char/token
        assert s.depth_actual == pytest.approx(depth, abs=0.01)


def test_upstreams_needle_lines_are_reached_from_their_depths():
    """eval_long_context runs upstream rows j = 0, step, 2 step, ...: depth j / lines asks for exactly that line."""
    lines, step = NUM_NOISE[7], STEP[7]
    assert all(round((j / lines) * lines) == j for j in range(0, lines + 1, step))


def test_exact_runs_keep_their_options_and_ids():
    tok = ByteTokenizer()
    plain, exact = get_task("passkey")(tok, {}), get_task("passkey")(tok, {"shape": "exact"})
    upstream = get_task("passkey")(tok, {"shape": "upstream"})
    assert "shape" not in plain.options and "shape" not in exact.options and upstream.options["shape"] == "upstream"
    assert plain.sample_id(8192, 0.5, 1) == exact.sample_id(8192, 0.5, 1) != upstream.sample_id(8192, 0.5, 1)
    assert upstream.make_sample(8192, 0.5, 1).id == upstream.sample_id(8192, 0.5, 1)  # the spec's id


@pytest.mark.parametrize("options, match", [
    ({"shape": "cut"}, "unknown shape 'cut': choose exact"),
    ({"shape": "upstream", "template": "landmark"}, 'use template = "trtllm", haystack = "noise"'),
    ({"shape": "upstream", "key_digits": 8}, "key_digits = 5"),
])
def test_bad_shapes_are_one_line(options, match):
    with pytest.raises(UsageError, match=match) as err:
        get_task("passkey")(ByteTokenizer(), options)
    assert "\n" not in str(err.value)


# --- kv_retrieval ----------------------------------------------------------------------------------------------
UUID_PAIR = re.compile(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"')


@pytest.mark.parametrize("cnt", [0, 100, 250, 499])
def test_the_kv_prompt_is_upstreams_for_its_pairs(cnt):
    """Upstream's row ``cnt`` asks index ``int(cnt * n / 500)``; the sample at that depth asks the same index, and
    its prompt is upstream's prompt over the same records in the same order."""
    tok = ByteTokenizer()
    n = upstream_pairs(16384)
    ans_id = min(int(cnt * n / 500), n)
    s = get_task("kv_retrieval")(tok, {"shape": "upstream"}).make_sample(16384, ans_id / n, seed=3)
    records = [list(p) for p in UUID_PAIR.findall(s.prompt)]
    assert len(records) == n == 232 and s.meta["n_pairs"] == n and s.meta["asked_pair"] == ans_id  # 928 per 64K
    eg = build_kv_retrieval_one(records, cnt, nnoise=n)
    assert s.prompt == create_prompt(eg, "kv_retrieval") and s.target == [eg["answer"]]
    assert s.meta["prompt_tokens"] == len(s.prompt_ids) != 16384 == s.context_length


@pytest.mark.parametrize("level", [0, 1])
def test_the_kv_pair_counts_are_upstreams_table_at_its_levels(level):
    """Issue 26 B: at each of TensorRT-LLM's levels the prompt holds exactly its ``nnoise`` pairs (928 at 64K,
    not 2500 x 64K / 128K = 1250), and is upstream's prompt for those pairs."""
    length, n = KV_LEVELS[level], NNOISE[level]
    assert upstream_pairs(length) == n
    cnt = 123
    ans_id = min(int(cnt * n / 500), n)
    s = get_task("kv_retrieval")(ByteTokenizer(), {"shape": "upstream"}).make_sample(length, ans_id / n, seed=5)
    records = [list(p) for p in UUID_PAIR.findall(s.prompt)]
    assert len(records) == n == s.meta["n_pairs"] and s.meta["asked_pair"] == ans_id
    assert s.prompt == create_prompt(build_kv_retrieval_one(records, cnt, nnoise=n), "kv_retrieval")


def test_kv_pair_counts_between_and_beyond_the_levels():
    """evalctx's own counts where upstream has no level: 928 per 64K below, linear between, 2500 per 128K above."""
    assert [upstream_pairs(x) for x in (1, 16384, 65535, 65536, 98304, 131071, 131072, 262144, 1048576)] == [
        1, 232, 927, 928, 1714, 2499, 2500, 5000, 20000]


def test_upstreams_asked_indices_are_reached_from_their_depths():
    n = upstream_pairs(131072)
    assert n == 2500
    from evalctx.tasks.kv_retrieval import KvRetrievalTask

    task = KvRetrievalTask(ByteTokenizer(), {"shape": "upstream"})
    for cnt in (0, 1, 7, 123, 499):
        ans_id = min(int(cnt * n / 500), n)
        assert min(int(ans_id / n * n + 1e-9), n - 1) == ans_id  # the index make_sample takes for depth ans_id / n
    small = task.make_sample(2048, 0.5, seed=1)
    assert small.meta["asked_pair"] == int(0.5 * upstream_pairs(2048))


def test_kv_exact_runs_keep_their_ids_and_bad_shapes_are_refused():
    tok = ByteTokenizer()
    plain = get_task("kv_retrieval")(tok, {})
    assert plain.options == {} and plain.sample_id(4096, 0.5, 1) == get_task("kv_retrieval")(
        tok, {"shape": "exact"}).sample_id(4096, 0.5, 1)
    with pytest.raises(UsageError, match="unknown shape 'whole'"):
        get_task("kv_retrieval")(tok, {"shape": "whole"})


def test_an_upstream_shaped_suite_runs_with_one_row_per_level(tmp_path):
    """Through evalctx run: the rows' context_length is the asked level, n_prompt_tokens the prompt's own count."""
    import pandas as pd

    from evalctx.cli import main

    suite = tmp_path / "up.toml"
    suite.write_text('name = "up"\n[[tasks]]\ntask = "passkey"\nlengths = [8192]\ndepths = [0.0, 0.5, 1.0]\n'
                     'samples = 1\nmax_new_tokens = 6\n[tasks.options]\ntemplate = "trtllm"\nhaystack = "noise"\n'
                     'shape = "upstream"\n')
    assert main(["run", "--suite", str(suite), "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "up", "--no-progress"]) == 0
    df = pd.read_parquet(tmp_path / "up" / "results.parquet")
    assert len(df) == 3 and set(df["context_length"]) == {8192} and set(df["status"]) == {"ok"}
    assert (df["n_prompt_tokens"] != 8192).all() and df["n_prompt_tokens"].nunique() == 1  # whole lines: one count


def test_preflight_and_rows_see_the_prompts_own_count(tmp_path, monkeypatch):
    """Engine limits, memory and throughput are a matter of the prompt's own tokens, not of its level: the backend's
    preflight gets the counted lengths, prefill tokens/s divides the real count."""
    import pandas as pd

    from evalctx.backends.fake import FakeBackend
    from evalctx.cli import main

    seen = {}
    real = FakeBackend.preflight

    def spy(self, samples):
        seen.update({s.id: s.context_length for s in samples})
        return real(self, samples)

    monkeypatch.setattr(FakeBackend, "preflight", spy)
    suite = tmp_path / "up.toml"
    suite.write_text('name = "up"\n[[tasks]]\ntask = "passkey"\nlengths = [8192]\ndepths = [0.5]\nsamples = 1\n'
                     'max_new_tokens = 6\n[tasks.options]\ntemplate = "trtllm"\nhaystack = "noise"\nshape = "upstream"\n'
                     '[[tasks]]\ntask = "passkey"\nname = "exact"\nlengths = [1024]\ndepths = [0.5]\nsamples = 1\n')
    assert main(["run", "--suite", str(suite), "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "up", "--no-progress", "--backend-opt", "seconds_per_token=0.001"]) == 0
    df = pd.read_parquet(tmp_path / "up" / "results.parquet").set_index("task")
    real_count = int(df.loc["passkey", "n_prompt_tokens"])
    assert real_count != 8192 and sorted(seen.values()) == [1024, real_count]
    row = df.loc["passkey"]
    assert row["prefill_tokens_per_s"] == pytest.approx(real_count / row["ttft_s"])


def test_compare_refuses_an_upstream_shaped_run_against_an_exact_one(tmp_path, capsys):
    from evalctx.cli import main

    for run_id, shape in (("exact", ""), ("up", 'shape = "upstream"\n')):
        suite = tmp_path / f"{run_id}.toml"
        suite.write_text('name = "s"\n[[tasks]]\ntask = "passkey"\nlengths = [8192]\ndepths = [0.5]\nsamples = 1\n'
                         f'[tasks.options]\ntemplate = "trtllm"\nhaystack = "noise"\n{shape}')
        assert main(["run", "--suite", str(suite), "--backend", "fake", "--tokenizer", "byte", "--out",
                     str(tmp_path), "--run-id", run_id, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "exact"), str(tmp_path / "up")]) == 2
    assert "shape='exact'" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "exact"), str(tmp_path / "up"), "--allow-different", "task"]) == 0

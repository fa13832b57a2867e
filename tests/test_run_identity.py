"""Run identity (issue 21): a run never holds numbers of two models, two days or two settings. Chat templates
that write the date see the day the run was created on every resume; a server answering as another checkpoint
behind the same URL and model name is refused on resume, naming what changed."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from http_helpers import LlamaCppStub

from evalctx.models import chat_identity
from evalctx.cli import main
from evalctx.models.embedded import resolve_model
from evalctx.models.tokenizer import ByteTokenizer, load_tokenizer

# Llama 3.2's template, cut to what matters here: the system header writes today's date through strftime_now.
DATED = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- 'System: Today Date: ' + date_string + '\\n\\n' + system_message + '\\n' }}"
    "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant:' }}{%- endif %}"
)
# QwQ/Qwen2.5-style: a default system turn when the conversation has none.
DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<sys>' + messages[0]['content'] + '</sys>\\n' }}"
    "{%- set messages = messages[1:] %}{%- else %}{{- '<sys>You are a helpful and harmless assistant.</sys>\\n' }}"
    "{%- endif %}{%- for m in messages %}{{- '<' + m['role'] + '>' + m['content'] + '</' + m['role'] + '>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<assistant>' }}{%- endif %}"
)


def _model_with_template(dest: Path, template: str) -> Path:
    shutil.copytree(resolve_model("tiny").path, dest)
    (dest / "chat_template.jinja").write_text(template)
    return dest


def test_the_date_is_pinned_and_part_of_the_sample_id(tmp_path: Path) -> None:
    tok = load_tokenizer(_model_with_template(tmp_path / "m", DATED))
    assert chat_identity.uses_date(tok)
    from evalctx.tasks import get_task

    samples = {}
    for day in (dt.date(2026, 12, 7), dt.date(2027, 5, 19)):
        tok.chat_date = day
        task = get_task("passkey")(tok, {}, prompt_mode="chat")
        samples[day] = task.make_sample(600, 0.5, 0)
        assert day.strftime("%d %b %Y") in samples[day].prompt
    a, b = samples.values()
    assert a.id != b.id and a.prompt != b.prompt  # two days' prompts never share an id
    tok.chat_date = dt.date(2026, 12, 7)
    assert get_task("passkey")(tok, {}, prompt_mode="chat").make_sample(600, 0.5, 0).prompt == a.prompt


def test_generate_on_two_days_gives_two_ids_for_two_prompts(tmp_path: Path) -> None:
    model = _model_with_template(tmp_path / "m", DATED)
    out = {}
    for day in ("2026-12-07", "2027-05-19"):
        path = tmp_path / f"{day}.jsonl"
        assert main(["generate", "--suite", "passkey", "--tokenizer", str(model), "--prompt-mode", "chat",
                     "--lengths", "600", "--chat-date", day, "--out", str(path), "--no-progress"]) == 0
        out[day] = [json.loads(line) for line in path.read_text().splitlines()]
    a, b = out.values()
    assert {r["id"] for r in a}.isdisjoint(r["id"] for r in b)
    assert all("07 Dec 2026" in r["prompt"] for r in a) and all("19 May 2027" in r["prompt"] for r in b)


def _run(tmp_path: Path, model: Path, *extra: str) -> int:
    (tmp_path / "s.toml").write_text('name = "chat"\nprompt_mode = "chat"\n[[tasks]]\ntask = "passkey"\n'
                                     'lengths = [600]\ndepths = [0.0, 1.0]\nsamples = 2\n')
    return main(["run", "--suite", str(tmp_path / "s.toml"), "--backend", "fake", "--tokenizer", str(model),
                 "--out", str(tmp_path), "--run-id", "r", "--no-progress", *extra])


def test_a_run_resumed_another_day_keeps_the_day_it_was_created(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_with_template(tmp_path / "m", DATED)
    monkeypatch.setattr(chat_identity, "today", lambda: dt.date(2026, 12, 7))
    # Day 1: every other sample fails (error rows are retried on resume).
    assert _run(tmp_path, model, "--backend-opt", "fail_every=2") == 3
    first = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert (first["status"] == "error").sum() == 2
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["chat_template"]["date"] == "2026-12-07" and manifest["chat_template"]["uses_date"]
    assert "Today Date: 07 Dec 2026" in manifest["chat_template"]["frame"]
    # Day 2: the same command resumes the same run, and the retried samples are day 1's prompts.
    monkeypatch.setattr(chat_identity, "today", lambda: dt.date(2027, 5, 19))
    assert _run(tmp_path, model, "--backend-opt", "fail_every=2") == 3  # 1 of the 2 retried fails again
    assert _run(tmp_path, model, "--backend-opt", "fail_every=2") == 0
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert (df["status"] == "ok").all() and len(df) == 4
    tok = load_tokenizer(model)
    tok.chat_date = dt.date(2026, 12, 7)
    from evalctx.tasks import get_task
    import hashlib

    task = get_task("passkey")(tok, {}, prompt_mode="chat")
    for row in df.itertuples():
        sample = task.make_sample(600, row.depth, int(row.seed))
        assert sample.id == row.sample_id
        assert hashlib.sha1(sample.prompt.encode()).hexdigest() == row.prompt_sha1
    assert main(["show", str(tmp_path / "r"), df["sample_id"].iloc[0]]) == 0


def test_the_manifest_names_a_default_system_turn(tmp_path: Path) -> None:
    model = _model_with_template(tmp_path / "m", DEFAULT_SYSTEM)
    assert _run(tmp_path, model) == 0
    chat = json.loads((tmp_path / "r" / "manifest.json").read_text())["chat_template"]
    assert chat["default_system_turn"] == "You are a helpful and harmless assistant."
    assert chat["uses_date"] is False and chat["date"] is None
    assert chat["frame"].startswith("<sys>You are a helpful") and "{user}" in chat["frame"]


def test_a_server_swapped_behind_the_same_url_is_refused_on_resume(tmp_path: Path, capsys) -> None:
    (tmp_path / "s.toml").write_text('name = "h"\n[[tasks]]\ntask = "passkey"\nlengths = [300]\n'
                                     'depths = [0.0, 1.0]\nsamples = 2\nmax_new_tokens = 12\n')
    stub = LlamaCppStub(ByteTokenizer())
    stub.card = {"root": "/checkpoints/step-1000"}
    args = ["run", "--suite", str(tmp_path / "s.toml"), "--backend", "http", "--tokenizer", "byte", "--out",
            str(tmp_path), "--run-id", "h", "--no-progress"]
    with stub.run() as url:
        opts = ["--backend-opt", f"base_url={url}", "--backend-opt", "backoff_s=0.01"]
        assert main(args + opts) == 0
        before = (tmp_path / "h" / "manifest.json").read_text()
        assert json.loads(before)["identity"]["models.root"] == "/checkpoints/step-1000"
        stub.card = {"root": "/checkpoints/step-2000"}  # another checkpoint, the same URL and model name
        capsys.readouterr()
        assert main(args + opts) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "models.root: '/checkpoints/step-1000' -> '/checkpoints/step-2000'" in err[0]
        assert "--run-id NEW" in err[0]
        assert (tmp_path / "h" / "manifest.json").read_text() == before  # the run is left as it was
        stub.card = {"root": "/checkpoints/step-1000"}
        assert main(args + opts) == 0  # the same server again: the resume is accepted


# --- compare and the nightly gate: settings that differ are named and refused unless allowed ---------------------

GATE_SUITE = """
name = "gate"
seed = {seed}
prompt_mode = "{mode}"
[[tasks]]
task = "passkey"
lengths = [300]
depths = [0.0, 0.5, 1.0]
samples = 3
max_new_tokens = {budget}
"""


def _gate_run(tmp_path: Path, run_id: str, seed: int = 0, mode: str = "raw", budget: int = 8) -> Path:
    path = tmp_path / f"{run_id}.toml"
    path.write_text(GATE_SUITE.format(seed=seed, mode=mode, budget=budget))
    # The tiny model answers " 12345." in 7 tokens: a budget of 3 cuts every answer (a "regression" of the budget).
    assert main(["run", "--suite", str(path), "--backend", "hf", "--model", "tiny", "--out", str(tmp_path / "runs"),
                 "--run-id", run_id, "--no-progress"]) == 0
    return tmp_path / "runs" / run_id


@pytest.fixture(scope="module")
def gate_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("gate")
    return {"base": _gate_run(tmp, "base"), "budget3": _gate_run(tmp, "budget3", budget=3),
            "chat": _gate_run(tmp, "chat", mode="chat"), "seed7": _gate_run(tmp, "seed7", seed=7),
            "again": _gate_run(tmp, "again")}


@pytest.mark.parametrize("cand, setting, text", [
    ("budget3", "max_new_tokens", "max_new_tokens of passkey: 8 / 3"),
    ("chat", "prompt_mode", "prompt_mode of passkey: raw / chat"),
    ("seed7", "seed", "seed of passkey: 0 / 7"),
])
def test_compare_refuses_runs_measured_differently(gate_runs: dict[str, Path], cand: str, setting: str, text: str,
                                                   capsys) -> None:
    capsys.readouterr()
    assert main(["compare", str(gate_runs["base"]), str(gate_runs[cand])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0] and f"--allow-different {setting}" in err[0]
    assert "REGRESSION" not in err[0]
    # told that the difference is meant, it compares and says across what
    code = main(["compare", str(gate_runs["base"]), str(gate_runs[cand]), "--allow-different", setting, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [d["setting"] for d in result["differences"] if d["measurement"]] == [setting]
    assert code == (1 if result["regressed"] else 0)


def test_the_budget_example_no_longer_reads_as_a_regression_of_the_model(gate_runs: dict[str, Path],
                                                                         tmp_path: Path, capsys) -> None:
    """The issue's example: 'REGRESSION 1.000 -> 0.000' with not a word that the budget differs. The gate now
    refuses it (exit 2) before recording anything, and passes the like-for-like rerun."""
    history = tmp_path / "history"
    gate = ["--history", str(history), "--no-report", "--latency-tolerance", "1000"]  # timing is not the point
    assert main(["nightly-gate", str(gate_runs["base"]), *gate]) == 0
    capsys.readouterr()
    assert main(["nightly-gate", str(gate_runs["budget3"]), *gate]) == 2
    assert "max_new_tokens of passkey: 8 / 3" in capsys.readouterr().err
    assert main(["nightly-gate", str(gate_runs["again"]), *gate]) == 0
    runs = [json.loads(line) for line in (history / "runs.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in runs] == ["base", "again"]


def test_compare_of_two_models_lists_what_differs_in_the_report(gate_runs: dict[str, Path], tmp_path: Path) -> None:
    from evalctx.report.render import write_report

    other = tmp_path / "other"
    shutil.copytree(resolve_model("tiny").path, other)
    (tmp_path / "s.toml").write_text(GATE_SUITE.format(seed=0, mode="raw", budget=8))
    gen = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 5]}))
    assert main(["run", "--suite", str(tmp_path / "s.toml"), "--backend", "hf", "--model", str(other), "--out",
                 str(tmp_path), "--run-id", "other", "--no-progress"]) == 0
    _, md = write_report([gate_runs["base"], tmp_path / "other"], tmp_path / "report")
    text = md.read_text()
    assert "the system under test differs: model: digest" in text and r"end_ids \[2\] / end_ids \[2, 5\]" in text


QWEN3_LIKE = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] }}"
    "{%- if not loop.last %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_continued_answer_prefix_with_an_empty_think_block_is_named(tmp_path: Path) -> None:
    """endpoint=chat against a server that renders the answer prefix as a continued assistant turn: a Qwen3-style
    template puts an empty think block there, which the generation prompt evalctx measured does not have. The stop
    names that rendering and what to pass, not a template mismatch."""
    from http_helpers import StubServer, completion, Reply

    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.openai_http import HTTPBackend
    from evalctx.errors import LengthError
    from evalctx.records import GenerationRequest, GenerationResult
    from evalctx.tasks import get_task

    model = _model_with_template(tmp_path / "m", QWEN3_LIKE)
    tok = load_tokenizer(model)
    sample = get_task("passkey")(tok, {}, prompt_mode="chat").make_sample(600, 0.5, 0)
    req = GenerationRequest(sample_id=sample.id, prompt_ids=sample.prompt_ids, prompt=sample.prompt,
                            max_new_tokens=8, prompt_mode="chat", extra={"messages": sample.messages})
    with StubServer([Reply(body=completion())], owned_by="vllm").run() as url:
        opts = parse_options(HTTPBackend, {"base_url": url, "endpoint": "chat", "model": "stub-model"})
        backend = HTTPBackend(opts, BackendContext(model="stub-model", tokenizer=tok))
        with pytest.raises(LengthError) as info:
            backend._check_length(req, GenerationResult(text=" 1.", n_prompt_tokens=len(sample.prompt_ids) + 9))
    msg = str(info.value)
    assert "continue_final_message" in msg and "'<think>\\n\\n</think>\\n\\n'" in msg
    assert "endpoint=completions" in msg and "differs from --tokenizer's" not in msg


def test_a_haystack_folder_is_compared_by_its_content(tmp_path: Path, capsys) -> None:
    """The same text in another folder is the same task; other text in the same folder is not (review)."""
    for name, text in (("a", "The river runs. The hill stands. "), ("b", "The river runs. The hill stands. "),
                       ("c", "A cat sleeps. A dog barks. ")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text(text * 200)
    runs = {}
    for name in ("a", "b", "c"):
        suite = tmp_path / f"{name}.toml"
        suite.write_text(f'name = "h"\n[[tasks]]\ntask = "niah_single"\nlengths = [600]\ndepths = [0.5]\n'
                         f'samples = 1\n[tasks.options]\nhaystack = "essay"\nhaystack_dir = "{tmp_path / name}"\n')
        assert main(["run", "--suite", str(suite), "--backend", "fake", "--tokenizer", "byte", "--out",
                     str(tmp_path / "runs"), "--run-id", name, "--no-progress"]) == 0
        runs[name] = tmp_path / "runs" / name
    capsys.readouterr()
    assert main(["compare", str(runs["a"]), str(runs["b"])]) == 0
    assert main(["compare", str(runs["a"]), str(runs["c"])]) == 2
    assert "haystack_sha=" in capsys.readouterr().err


def test_the_chat_date_is_the_runs_own_on_resume(tmp_path: Path, capsys) -> None:
    """--chat-date is no part of the run id: the same command with or without it resumes; another day is refused
    by name (review)."""
    model = _model_with_template(tmp_path / "m", DATED)
    assert _run(tmp_path, model, "--chat-date", "2026-12-01") == 0
    assert _run(tmp_path, model) == 0  # resumes, keeping 2026-12-01
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["chat_template"]["date"] == "2026-12-01"
    capsys.readouterr()
    assert _run(tmp_path, model, "--chat-date", "2026-12-02") == 2
    assert "holds chat prompts rendered for 2026-12-01" in capsys.readouterr().err

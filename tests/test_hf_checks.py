"""The hf backend's checks before any generation: dtype spellings, model limits, the tokenizer against the model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evalctx.backends.base import BackendContext, parse_options  # noqa: E402
from evalctx.backends.hf import HFBackend  # noqa: E402
from evalctx.models.tokenizer import ByteTokenizer  # noqa: E402


def _random_model(path: Path, kind: str, **cfg: object) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=ByteTokenizer.vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, **common, **cfg)
        transformers.GPT2LMHeadModel(config).save_pretrained(path)
    else:
        cls = {"mistral": transformers.MistralConfig, "llama": transformers.LlamaConfig}[kind]
        config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, **common, **cfg)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama over the byte tokenizer's vocabulary, no tokenizer files of its own."""
    return _random_model(tmp_path_factory.mktemp("byte_llama"), "llama", max_position_embeddings=4096)


def make_backend(path: Path | str, tokenizer=None, **opts: object) -> HFBackend:
    options = parse_options(HFBackend, {"device": "cpu", **opts})
    return HFBackend(options, BackendContext(model=str(path), tokenizer=tokenizer or ByteTokenizer()))


def test_dtype_in_any_spelling(byte_llama: Path) -> None:
    assert make_backend(byte_llama, dtype="fp32").dtype == torch.float32
    assert make_backend(byte_llama, dtype="torch.float32").dtype == torch.float32
    assert make_backend(byte_llama, dtype="bf16").dtype == torch.bfloat16


def _run(tmp_path: Path, model: Path, lengths: str) -> pd.DataFrame:
    from evalctx.cli import main

    suite = tmp_path / "s.toml"
    suite.write_text(f'name = "s"\n[[tasks]]\ntask = "passkey"\nlengths = {lengths}\ndepths = [0.5]\nsamples = 2\n')
    code = main(["run", "--suite", str(suite), "--backend", "hf", "--model", str(model), "--tokenizer", "byte",
                 "--out", str(tmp_path), "--run-id", "r", "--no-progress", "--backend-opt", "device=cpu",
                 "--backend-opt", "threads=1"])
    assert code == 0
    return pd.read_parquet(tmp_path / "r" / "results.parquet")


def test_a_sliding_window_makes_longer_prompts_unsupported(tmp_path: Path, capsys) -> None:
    """The issue's example: a window of 256 and a 900-token prompt was scored as if the model had read it."""
    model = _random_model(tmp_path / "m", "mistral", sliding_window=256, max_position_embeddings=4096)
    df = _run(tmp_path, model, "[250, 900]").set_index("context_length")
    assert set(df.loc[250, "status"]) == {"ok"} and set(df.loc[900, "status"]) == {"unsupported"}
    assert df.loc[900, "error"].str.contains("attention sees only the last 256 tokens").all()
    assert "evalctx: unsupported:" in capsys.readouterr().err


def test_absolute_positions_make_longer_prompts_unsupported(tmp_path: Path) -> None:
    model = _random_model(tmp_path / "m", "gpt2", n_positions=512)
    df = _run(tmp_path, model, "[300, 900]").set_index("context_length")
    assert set(df.loc[300, "status"]) == {"ok"} and set(df.loc[900, "status"]) == {"unsupported"}
    assert df.loc[900, "error"].str.contains("512 learned absolute positions").all()


def test_rope_beyond_the_stated_window_runs_flagged_and_the_report_marks_it(tmp_path: Path) -> None:
    model = _random_model(tmp_path / "m", "llama", max_position_embeddings=512)
    df = _run(tmp_path, model, "[300, 600]")
    assert (df["status"] == "ok").all()
    flagged = {int(n): [list(f) for f in g["flags"]] for n, g in df.groupby("context_length")}
    assert flagged == {300: [[], []], 600: [["beyond_trained_window"]] * 2}
    pytest.importorskip("matplotlib")
    from evalctx.report.render import write_report

    _, md = write_report([tmp_path / "r"])
    text = md.read_text()
    assert "2 scored samples at 600 are flagged beyond_trained_window" in text
    assert "max_position_embeddings" in text


def test_a_bpe_trained_on_other_text_is_refused(tmp_path: Path) -> None:
    from tokenizer_fixtures import save_hf

    from evalctx.errors import UsageError
    from evalctx.models.tokenizer import HFTokenizer

    other = HFTokenizer(save_hf("bpe_digits", tmp_path / "other", vocab_size=1024))
    with pytest.raises(UsageError, match="does not tokenize like the one tiny ships.*pass --tokenizer tiny"):
        make_backend("tiny", tokenizer=other)
    same = tmp_path / "copy"  # the model's own tokenizer files, elsewhere: fine
    same.mkdir()
    tiny = Path(__file__).resolve().parent.parent / "evalctx" / "data" / "models" / "tiny"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (same / name).write_bytes((tiny / name).read_bytes())
    make_backend("tiny", tokenizer=HFTokenizer(same))  # no error


def test_ids_beyond_the_embedding_table_are_refused(byte_llama: Path, tmp_path: Path) -> None:
    """A model directory without tokenizer files: only the ranges can be checked, and they are."""
    from tokenizer_fixtures import get_tokenizer

    from evalctx.errors import UsageError
    from evalctx.models.tokenizer_check import check_tokenizer

    with pytest.raises(UsageError, match=r"has 2000 text tokens but .* 259 rows"):
        make_backend(byte_llama, tokenizer=get_tokenizer("bpe_llama3"))
    make_backend(byte_llama)  # the byte tokenizer fits its 259 rows

    far_eos = ByteTokenizer()
    far_eos.eos_token_id = 300
    with pytest.raises(UsageError, match=r"special token id\(s\) \[300\] lie beyond m's 259-row"):
        check_tokenizer(far_eos, "m", 259)


def test_a_model_without_tokenizer_files(tmp_path: Path, capsys) -> None:
    """The issue's `--tokenizer byte` against a model with a larger vocabulary that ships no tokenizer: it crashed
    with a ValueError traceback when the model wrote an id past the byte range; now it warns before the run and
    the run completes (scored, as it must be, 0). No tokenizer at all is one line; the hint never names the model
    directory as a tokenizer when it has none."""
    import shutil

    from evalctx.cli import main
    from evalctx.models.embedded import resolve_model

    tiny = resolve_model("tiny").path
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny / name, bare / name)
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\n[[tasks]]\ntask = "passkey"\nlengths = [256]\ndepths = [0.5]\nsamples = 2\n')
    base = ["run", "--suite", str(suite), "--backend", "hf", "--model", str(bare), "--out", str(tmp_path),
            "--no-progress", "--backend-opt", "device=cpu", "--backend-opt", "threads=1"]
    assert main([*base, "--tokenizer", "byte", "--run-id", "byte"]) == 0
    err = capsys.readouterr().err
    assert "warning: tokenizer byte has 259 text tokens but bare's embedding table has 1024 rows" in err
    assert "pass the tokenizer the model was trained with" in err and "Traceback" not in err
    assert len(pd.read_parquet(tmp_path / "byte" / "results.parquet")) == 2

    assert main([*base, "--run-id", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no tokenizer files" in err and "pass --tokenizer DIR" in err

    from tokenizer_fixtures import get_tokenizer

    from evalctx.errors import UsageError

    with pytest.raises(UsageError) as info:
        make_backend(bare, tokenizer=get_tokenizer("bpe_llama3"))
    assert "has 2000 text tokens" in str(info.value) and f"--tokenizer {bare}" not in str(info.value)


def test_the_byte_tokenizer_decodes_ids_past_its_range_to_nothing() -> None:
    assert ByteTokenizer().decode([3 + ord("4"), 900, 3 + ord("2"), 1, 2]) == "42"

"""The runner's sample order for prefix caches (evalctx.run.prefix_order): common prefixes of token ids, the order that
computes each distinct prefix token once, windows, and the runner journaling in that order."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalctx.cli import main
from evalctx.config import load_suite
from evalctx.backends.base import common_prefix
from evalctx.run.prefix_order import computed_tokens, order_by_prefix, prefix_windows
from evalctx.run.sampling import SampleBuilder
from evalctx.models.tokenizer import load_tokenizer

SWEEP = """
name = "sweep"
prompt_mode = "{mode}"
[[tasks]]
task = "{task}"
lengths = [{length}]
depths = {{ linear = 11 }}
samples = 1
"""


def _sweep(tmp_path: Path, task: str = "passkey", mode: str = "raw", length: int = 4096) -> list:
    path = tmp_path / f"{task}-{mode}.toml"
    path.write_text(SWEEP.format(task=task, mode=mode, length=length))
    builder = SampleBuilder(load_suite(str(path)), load_tokenizer("tiny"))
    return [builder.build(s) for s in builder.specs()]


def _trie_nodes(prompts: list[list[int]]) -> int:
    """Distinct non-empty prefixes: what any order must compute at least once."""
    root: dict = {}
    n = 0
    for p in prompts:
        node = root
        for t in p:
            if t not in node:
                node[t] = {}
                n += 1
            node = node[t]
    return n


def test_common_prefix() -> None:
    a = list(range(10_000))
    b = list(a)
    b[5000] = -1  # past the first compared block
    assert common_prefix(a, b) == 5000
    assert common_prefix(a, a[:7000]) == common_prefix(a[:7000], a) == 7000
    assert common_prefix(a, list(a)) == 10_000
    assert common_prefix([1, 2], [2, 2]) == 0
    assert common_prefix([], a) == 0
    assert common_prefix(a[:4096] + [1], a[:4096] + [2]) == 4096  # the mismatch right after a block


def test_order_follows_token_ids_not_depths() -> None:
    items = [SimpleNamespace(name=n, prompt_ids=p) for n, p in
             (("a", [1, 2, 3, 9]), ("b", [5]), ("c", [1, 2, 3, 4]), ("d", [1, 2, 7]), ("e", [1, 2, 3, 4]))]
    assert [s.name for s in order_by_prefix(items)] == ["c", "e", "a", "d", "b"]  # equal prompts keep their order
    assert computed_tokens([s.prompt_ids for s in order_by_prefix(items)]) == 4 + 1 + 1 + 1 + 1


@pytest.mark.parametrize("task,mode", [("passkey", "raw"), ("passkey", "chat"), ("niah_single", "raw"),
                                       ("niah_multikey", "chat")])
def test_depth_sweep_order_computes_each_prefix_once(tmp_path: Path, task: str, mode: str) -> None:
    samples = _sweep(tmp_path, task, mode)
    prompts = [s.prompt_ids for s in order_by_prefix(samples)]
    best = computed_tokens(prompts)
    assert best == _trie_nodes(prompts)  # no order of one cached prompt can do less
    rng = random.Random(0)
    for _ in range(20):
        shuffled = list(prompts)
        rng.shuffle(shuffled)
        assert computed_tokens(shuffled) >= best
    naive = sum(len(p) for p in prompts)
    # The example: an 11-depth linear sweep at one length, <= 0.65x the prompt tokens of the naive one.
    # Every prompt, the depth-1 one included, shares the haystack's start (evalctx.tasks.placement), so the sweep
    # computes the first prompt whole and each other one from its needle on: (1 + 0.1 + ... + 1.0) / 11 = 0.59
    # (a little more with several needles per prompt, which differ per sample).
    assert 0.585 < best / naive < 0.605


def test_prefix_windows_group_equal_shapes_longest_first() -> None:
    specs = [SimpleNamespace(id=i, context_length=n, max_new_tokens=m)
             for i, (n, m) in enumerate([(1000, 8), (4000, 8), (1000, 6), (4000, 8), (1000, 8), (4000, 8)])]
    windows = prefix_windows(specs, window_tokens=8000)
    assert [[s.id for s in w] for w in windows] == [[1, 3], [5], [2], [0, 4]]
    assert [[s.id for s in w] for w in prefix_windows(specs, window_tokens=1)] == [[1], [3], [5], [2], [0], [4]]


def test_runner_runs_a_window_in_prefix_order(tmp_path: Path) -> None:
    """Through the runner (fake backend, 2 per batch): the prompts reach the backend in token-id order, whatever
    order the specs came in, and the ids and prompts are those of the suite."""
    suite = tmp_path / "s.toml"
    suite.write_text(SWEEP.format(task="passkey", mode="raw", length=1024))
    code = main(["run", "--suite", str(suite), "--backend", "fake", "--tokenizer", "tiny", "--out", str(tmp_path),
                 "--run-id", "r", "--no-progress", "--batch-size", "2",
                 "--backend-opt", f"record_dir={tmp_path / 'rec'}"])
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "journal" / "replica-0.jsonl").read_text().splitlines()]
    by_id = {s.id: s for s in _sweep(tmp_path, length=1024)}
    assert sorted(r["sample_id"] for r in rows) == sorted(by_id)
    journaled = [by_id[r["sample_id"]].prompt_ids for r in rows]
    assert journaled == sorted(journaled)
    assert all(r["n_cached_prompt_tokens"] == 0 for r in rows)  # the fake has no cache: every prefill is cold
    assert all(r["batch_size"] == 2 for r in rows[:10])
    assert len((tmp_path / "rec" / "rank0.txt").read_text().splitlines()) == 6


@pytest.mark.parametrize("chunk", [8192, 2048])
def test_readme_quotes_the_prefix_reuse_csv(chunk: int) -> None:
    """The README's prefix-reuse rows are the committed benchmark CSVs' sums (tokens computed, prefill), and the
    answers in them are the same token ids with and without reuse."""
    import csv

    root = Path(__file__).resolve().parents[1]
    text = " ".join((root / "README.md").read_text().split())
    csv_path = root / f"benchmarks/results/prefix_reuse_H200_l3-4_chunk{chunk}_2026-11-30.csv"
    rows = list(csv.DictReader(csv_path.open()))
    for length, name in ((32768, "32K"), (131072, "128K")):
        cold = [r for r in rows if int(r["length"]) == length and r["prefix_reuse"] == "False"]
        warm = [r for r in rows if int(r["length"]) == length and r["prefix_reuse"] == "True"]
        assert len(cold) == len(warm) == 11
        by_depth = {r["depth"]: r["output_ids"] for r in cold}
        assert all(r["output_ids"] == by_depth[r["depth"]] and len(r["output_ids"].split()) == 6 for r in warm)
        tokens = sum(length - int(r["n_cached_prompt_tokens"]) for r in warm) / (11 * length)
        pre_w, pre_c = sum(float(r["ttft_s"]) for r in warm), sum(float(r["ttft_s"]) for r in cold)
        quote = (f"| {name} / {chunk} | {tokens:.3f}x (ideal 0.591x) | {pre_w:.2f} s of {pre_c:.2f} s "
                 f"= {pre_w / pre_c:.2f}x |")
        assert quote in text, quote

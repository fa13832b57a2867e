#!/usr/bin/env python3
"""Train evalctx's embedded tiny Llama (evalctx/data/models/tiny) from a seed.

The model exists so that ``evalctx run`` with no hub draws a real accuracy-vs-length curve: it retrieves passkeys
and needles at the lengths it was trained on and fails beyond them. Everything it sees comes from evalctx's own
task generators (passkey with the trtllm and landmark templates, niah_single; noise and essay haystacks; raw and
chat prompts), so every default prompt is in distribution -- a model trained on look-alike text scores far lower
on prose it never saw.

Steps, all deterministic from ``--seed`` on a given device:
1. a byte-level BPE tokenizer trained with ``tokenizers`` on the generators' own text (prompts rendered through the
   byte tokenizer, the essay corpus, the noise line), digits split one per token, <s> prepended, a chat template;
2. a LlamaForCausalLM (head_dim 64, tied embeddings, RoPE theta 1e4) trained on exact-length prompts followed by
   the answer (`` 12345.`` then ``</s>``, so greedy decoding stops), with a length curriculum: without it the
   copying behaviour does not appear within a CPU budget;
3. ``save_pretrained`` of model, tokenizer and generation config into ``--out``, plus ``train_log.json``.

Batch ``step`` is a pure function of (seed, step), so data can be made by worker processes in any order. Results
are deterministic for a given device and torch thread count (the shipped model: defaults, on CUDA).

    python scripts/train_tiny.py --device cpu --threads 2 --out /tmp/tiny   # 19.6 min on a busy 2-core machine
    python scripts/train_tiny.py --device cuda --workers 6 --out /tmp/tiny  # 96 s on an H200
    python scripts/eval_tiny.py --model /tmp/tiny                           # accuracy table (see eval_tiny.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

# Sleep rather than spin while waiting for OpenMP work: on a shared 2-core machine spinning threads made each
# step ~7x slower. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))

# -- the training distribution -------------------------------------------------------------------------------------
# (weight, task, options). Every haystack and template the default suites can ask for is here.
MIX: list[tuple[float, str, dict[str, Any]]] = [
    (2.0, "passkey", {"template": "trtllm", "haystack": "noise"}),
    (2.0, "passkey", {"template": "trtllm", "haystack": "essay"}),
    (1.0, "passkey", {"template": "landmark", "haystack": "noise"}),
    (1.0, "passkey", {"template": "landmark", "haystack": "essay"}),
    (2.0, "niah_single", {"haystack": "noise"}),
    (2.0, "niah_single", {"haystack": "essay"}),
]
CHAT_FRACTION = 0.25
KEY5_FRACTION = 0.6  # passkey (trtllm): 5 digits (the default) this often, else 2..9 digits
ENDPOINT_DEPTH = 0.1  # depth exactly 0.0 / 1.0 this often each: the edge cases every depth grid holds
MIN_LEN = 96

# -- tokenizer ------------------------------------------------------------------------------------------------------
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIALS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]  # ids 0..6: unk 0, bos 1, eos 2 as in Llama
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# -- model ------------------------------------------------------------------------------------------------------------
MAX_POSITIONS = 1 << 20  # the positions limit a long-context run may use, not what the model learned
ROPE_THETA = 10000.0


def get_task_class(name: str):
    from evalctx.tasks import get_task

    return get_task(name)


def key_digits_for(rng: random.Random) -> int:
    return 5 if rng.random() < KEY5_FRACTION else rng.randint(2, 9)


def pick_config(rng: random.Random) -> tuple[str, dict[str, Any], str]:
    total = sum(w for w, _, _ in MIX)
    x = rng.random() * total
    for w, task, opts in MIX:
        x -= w
        if x < 0:
            break
    opts = dict(opts)
    if opts.get("template") == "trtllm":  # landmark keys are 1..50000 by definition
        opts["key_digits"] = key_digits_for(rng)
    mode = "chat" if rng.random() < CHAT_FRACTION else "raw"
    return task, opts, mode


def pick_depth(rng: random.Random) -> float:
    x = rng.random()
    if x < ENDPOINT_DEPTH:
        return 0.0
    if x < 2 * ENDPOINT_DEPTH:
        return 1.0
    return rng.random()


class TaskPool:
    """Task instances per (task, options, mode) for one tokenizer, and their shortest buildable lengths."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._tasks: dict[str, Any] = {}
        self._min: dict[str, int] = {}

    def get(self, task: str, opts: dict[str, Any], mode: str) -> Any:
        key = json.dumps([task, opts, mode], sort_keys=True)
        if key not in self._tasks:
            self._tasks[key] = get_task_class(task)(self.tok, opts, mode)
            self._min[key] = self._tasks[key].min_length()
        return self._tasks[key], self._min[key]


def build_sample(task: Any, length: int, depth: float, seed: int) -> Any:
    """``task.make_sample``, a few tokens longer where this seed's needle or question does not fit ``length``."""
    from evalctx.errors import LengthError

    for extra in (0, 8, 32, 128):
        try:
            return task.make_sample(length + extra, depth, seed)
        except LengthError:
            if extra == 128:
                raise
    raise AssertionError("unreachable")


def answer_text(sample: Any) -> str:
    """What the model is taught to say after the prompt: a space, the answer, a full stop (then EOS)."""
    return " " + sample.target[0] + "."


# -- tokenizer ------------------------------------------------------------------------------------------------------
def tokenizer_corpus(seed: int, per_config: int) -> list[str]:
    """The generators' own text: prompts rendered through the byte tokenizer (raw and chat), essays, noise."""
    from evalctx.tasks.haystack import NOISE_SENTENCE, essay_haystack
    from evalctx.models.tokenizer import ByteTokenizer

    rng = random.Random(seed)
    texts = [essay_haystack().text] * 3 + [(NOISE_SENTENCE + "\n") * 20]
    pools = {"raw": TaskPool(ByteTokenizer()), "chat": TaskPool(ByteTokenizer(chat=True))}
    strip = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))
    for _, task, base in MIX:
        for mode in ("raw", "chat"):
            for _ in range(per_config):
                opts = dict(base)
                if opts.get("template") == "trtllm":
                    opts["key_digits"] = key_digits_for(rng)
                t, lo = pools[mode].get(task, opts, mode)
                s = build_sample(t, lo + rng.randint(0, 600), rng.random(), rng.getrandbits(31))
                texts.append(strip.sub("", s.prompt) + answer_text(s))
    return texts


def build_tokenizer(out: Path, seed: int, vocab_size: int, per_config: int = 150) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed, per_config), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    write_compat_tokenizer_files(out)


def write_compat_tokenizer_files(out: Path) -> None:
    """Spell the tokenizer config the way every transformers release reads it: the generic fast class, the chat
    template inline (not only chat_template.jinja) and a special_tokens_map.json."""
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["additional_special_tokens"] = list(ROLE_TOKENS)
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    smap = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
            "additional_special_tokens": list(ROLE_TOKENS)}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


# -- data -------------------------------------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _worker_init(tok_dir: str, cfg: dict[str, Any]) -> None:
    from evalctx.models.tokenizer import HFTokenizer

    tok = HFTokenizer(tok_dir)
    _W.update(tok=tok, pool=TaskPool(tok), cfg=cfg)


def length_cap(step: int, cfg: dict[str, Any]) -> int:
    """The curriculum: the longest prompt at this step, rising from MIN_LEN to max_len."""
    ramp = max(int(cfg["steps"] * cfg["curriculum"]), 1)
    return int(MIN_LEN + (cfg["max_len"] - MIN_LEN) * min(1.0, step / ramp))


def make_batch(step: int) -> dict[str, Any]:
    """Batch ``step``: one sampled length for all rows (each row at least its task's minimum), padded right."""
    tok, pool, cfg = _W["tok"], _W["pool"], _W["cfg"]
    h = hashlib.sha256(f"{cfg['seed']}:{step}".encode()).digest()
    rng = random.Random(int.from_bytes(h[:8], "little"))
    L = rng.randint(MIN_LEN, length_cap(step, cfg))
    n = max(1, cfg["batch_tokens"] // L)
    rows, spans = [], []
    for _ in range(n):
        task, opts, mode = pick_config(rng)
        t, lo = pool.get(task, opts, mode)
        s = build_sample(t, max(L, lo + rng.randint(0, 16)), pick_depth(rng), rng.getrandbits(31))
        ans = tok.encode(answer_text(s), add_special_tokens=False) + [tok.eos_token_id]
        rows.append(list(s.prompt_ids) + ans)
        spans.append((len(s.prompt_ids), len(ans)))
    return {"step": step, "rows": rows, "spans": spans}


def batch_stream(tok_dir: Path, cfg: dict[str, Any], start: int, workers: int):
    steps = range(start, cfg["steps"])
    if workers <= 0:
        _worker_init(str(tok_dir), cfg)
        for s in steps:
            yield make_batch(s)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process that already runs torch threads
    with ctx.Pool(workers, initializer=_worker_init, initargs=(str(tok_dir), cfg)) as p:
        yield from p.imap(make_batch, steps, chunksize=2)


# -- model and training -----------------------------------------------------------------------------------------------
def model_shape(args: argparse.Namespace) -> dict[str, int]:
    heads = args.hidden // 64  # head_dim 64: what long-context attention kernels run well
    return dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=heads, num_key_value_heads=heads, head_dim=64)


def make_config(tok_dir: Path, shape: dict[str, int]):
    from transformers import AutoTokenizer, LlamaConfig

    t = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return LlamaConfig(
        vocab_size=len(t), max_position_embeddings=MAX_POSITIONS, rope_theta=ROPE_THETA, tie_word_embeddings=True,
        rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, **shape,
    )


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    p = (step - cfg["warmup"]) / max(cfg["steps"] - cfg["warmup"], 1)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def to_tensors(batch: dict[str, Any], pad_id: int, device: Any):
    import torch

    rows, spans = batch["rows"], batch["spans"]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    ans = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (r, (p, a)) in enumerate(zip(rows, spans)):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, :len(r)] = ids[i, :len(r)]
        ans[i, p:p + a] = True  # label positions: the answer tokens and EOS
    return ids.to(device), labels.to(device), ans.to(device)


def attention_backend(device: Any):
    """On CUDA the math SDPA kernel: the fused fp32 kernel's backward is not deterministic, and this model is far
    too small for the difference in speed to matter."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    build_tokenizer(out, args.seed, args.vocab_size, args.corpus_samples)
    t_tok = time.perf_counter() - t_start
    print(f"tokenizer: {out} ({t_tok:.1f} s)", flush=True)

    cfg = dict(seed=args.seed, steps=args.steps, max_len=args.max_len, batch_tokens=args.batch_tokens,
               curriculum=args.curriculum, lr=args.lr, warmup=args.warmup)
    shape = model_shape(args)
    config = make_config(out, shape)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, {shape}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    pad_id = config.pad_token_id
    log: list[dict[str, Any]] = []
    acc = {"loss": 0.0, "ans_loss": 0.0, "ans_acc": 0.0, "n": 0, "tokens": 0}
    t_train = time.perf_counter()
    model.train()
    for batch in batch_stream(out, cfg, 0, args.workers):
        step = batch["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids, labels, ans = to_tensors(batch, pad_id, device)
        with attention_backend(device):
            logits = model(input_ids=ids).logits[:, :-1].float()
        tgt, amask = labels[:, 1:], ans[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                               ignore_index=-100, reduction="none").view_as(tgt)
        valid = tgt != -100
        lm_loss = ce[valid].mean()
        ans_loss = ce[amask].mean()
        loss = lm_loss + args.answer_weight * ans_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        with torch.no_grad():
            ans_acc = (logits.argmax(-1)[amask] == tgt[amask]).float().mean()
        acc["loss"] += float(lm_loss.detach())
        acc["ans_loss"] += float(ans_loss.detach())
        acc["ans_acc"] += float(ans_acc)
        acc["n"] += 1
        acc["tokens"] += int(valid.sum())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = acc["n"]
            rec = {"step": step + 1, "len_cap": length_cap(step, cfg), "lm_loss": round(acc["loss"] / k, 4),
                   "ans_loss": round(acc["ans_loss"] / k, 4), "ans_tok_acc": round(acc["ans_acc"] / k, 4),
                   "lr": round(lr_at(step, cfg), 6), "elapsed_s": round(time.perf_counter() - t_start, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            acc = {"loss": 0.0, "ans_loss": 0.0, "ans_acc": 0.0, "n": 0, "tokens": 0}
    train_s = time.perf_counter() - t_train

    model.eval()
    model = model.to("cpu")
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, do_sample=False)
    model.save_pretrained(str(out), safe_serialization=True)
    write_compat_config(out / "config.json")
    wall = time.perf_counter() - t_start
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seed": args.seed, "steps": args.steps, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "workers": args.workers, "torch": torch.__version__,
        "n_parameters": n_params, "model": shape, "vocab_size": config.vocab_size, "hparams": cfg,
        "answer_weight": args.answer_weight, "tokenizer_s": round(t_tok, 1), "train_s": round(train_s, 1),
        "wall_s": round(wall, 1), "final": log[-1] if log else None, "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved {out}: wall {wall:.1f} s (training {train_s:.1f} s)", flush=True)
    return summary


def write_compat_config(path: Path, rope_scaling: dict[str, Any] | None = None) -> None:
    """Add the transformers-4 spelling of the RoPE settings (``rope_theta``, ``rope_scaling``) next to
    transformers-5's ``rope_parameters``, so older readers (TensorRT-LLM's converter among them) see the same model."""
    cfg = json.loads(path.read_text())
    params = dict(cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": ROPE_THETA})
    if rope_scaling:
        params.update(rope_scaling)
    cfg["rope_parameters"] = params
    cfg["rope_theta"] = params.get("rope_theta", ROPE_THETA)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--workers", type=int, default=0, help="data worker processes (0 = make batches in-process)")
    p.add_argument("--max-len", type=int, default=1024, help="top of the length curriculum (prompt tokens)")
    p.add_argument("--curriculum", type=float, default=0.5, help="fraction of steps over which the cap rises")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--answer-weight", type=float, default=4.0,
                   help="weight of the answer tokens' mean loss, added to the mean loss over all tokens")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 64: heads of 64)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--corpus-samples", type=int, default=150,
                   help="prompts per (task variant, mode) in the tokenizer's training text")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())

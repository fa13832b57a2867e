"""Greedy decoding as the model's own ``generate(do_sample=False)`` decodes: its end tokens, and the logits
processors its ``generation_config.json`` switches on even without sampling.

* **End tokens.** ``generate`` stops on ``generation_config.eos_token_id`` (an id or a list); a tokenizer whose
  ``eos_token`` is another id (a chat model's end-of-turn marker in one file, ``</s>`` in the other) would have
  decoding run past the answer's end to the budget. Serving engines stop on both (vLLM adds the generation config's
  ids to the tokenizer's EOS): so does evalctx.
* **Processors.** With ``do_sample=False`` a generation config's ``repetition_penalty`` still applies (Qwen2.5
  Instruct ships 1.05): every token of the prompt and the answer so far has its logit divided (positive) or
  multiplied (negative) by it, which can change a passkey's repeated digits. evalctx applies it with transformers'
  own ``RepetitionPenaltyLogitsProcessor``. Fields that change greedy decoding in ways evalctx does not reproduce
  (beam search, n-gram bans, forced or suppressed tokens, minimum lengths) are refused with the field named.
  ``temperature``, ``top_k``, ``top_p`` and ``do_sample`` are sampling settings: greedy decoding ignores them, as
  ``generate(do_sample=False)`` does.

Upstream: ``GenerationMixin._get_logits_processor`` in transformers' ``generation/utils.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from evalctx.errors import UsageError

# generation_config fields that change what generate(do_sample=False) returns and that evalctx does not apply,
# with their no-op values (transformers' GenerationConfig defaults).
_REFUSED: dict[str, Any] = {
    "num_beams": 1,
    "penalty_alpha": None,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "dola_layers": None,
    "watermarking_config": None,
    "stop_strings": None,
}


def end_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    """Every id that ends an answer: ``generation_config.eos_token_id`` (int or list) and the tokenizer's
    ``eos_token_id``."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if isinstance(value, int):
            ids.add(value)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    return ids


@dataclass
class GreedyRules:
    """The greedy-relevant settings of a model's generation config, as ``generate(do_sample=False)`` applies them."""

    repetition_penalty: float = 1.0
    min_length: int = 0
    """``generate`` suppresses the end tokens until prompt + answer reach this many tokens: no effect on a prompt
    at least that long, which :meth:`GreedyStepper` checks per batch."""
    source: str = "generation_config.json"
    applied: list[str] = field(default_factory=list)
    """What applies, for the manifest (``["repetition_penalty 1.05"]``); empty for plain argmax."""

    @classmethod
    def from_model(cls, generation_config: Any, model_name: str, mode: str) -> "GreedyRules":
        """``mode`` "model": follow the generation config (UsageError naming a field evalctx cannot apply);
        "none": plain argmax whatever the config says."""
        if mode == "none" or generation_config is None:
            return cls(applied=[])
        if mode != "model":
            raise UsageError(f"backend hf: generation_config must be 'model' or 'none', got {mode!r}")
        for name, default in _REFUSED.items():
            value = getattr(generation_config, name, default)
            if value is not None and value != default and value != []:
                raise UsageError(
                    f"backend hf: {model_name}'s generation_config.json sets {name}={value!r}, which changes what "
                    f"generate(do_sample=False) returns and which evalctx does not apply: remove it from the file, "
                    f"or pass --backend-opt generation_config=none to decode by plain argmax")
        penalty = getattr(generation_config, "repetition_penalty", None)
        penalty = 1.0 if penalty is None else float(penalty)
        if penalty <= 0:
            raise UsageError(f"backend hf: {model_name}'s generation_config.json sets repetition_penalty={penalty}; "
                             f"it must be > 0")
        min_length = getattr(generation_config, "min_length", 0) or 0
        return cls(repetition_penalty=penalty, min_length=int(min_length),
                   applied=[f"repetition_penalty {penalty:g}"] if penalty != 1 else [])

    @property
    def active(self) -> bool:
        return self.repetition_penalty != 1.0


class GreedyStepper:
    """Picks each next token of a batch by greedy decoding under :class:`GreedyRules`.

    ``seen`` holds, per row, the distinct prompt tokens (padded with the row's own first token, which repeats a
    token already there) and then every generated token: all the repetition penalty needs, a few thousand ids
    instead of the whole 1M-token prompt per step.
    """

    def __init__(self, rules: GreedyRules, prompts: Any) -> None:
        if rules.min_length > prompts.shape[1]:
            raise UsageError(f"backend hf: generation_config.json sets min_length={rules.min_length}, over this "
                             f"{prompts.shape[1]}-token prompt: generate would hold back the end token, which evalctx "
                             "does not do; pass --backend-opt generation_config=none or drop shorter lengths")
        self.rules = rules
        self.seen: Any = None
        self.processor: Any = None
        if rules.active:
            import torch
            from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

            self.processor = RepetitionPenaltyLogitsProcessor(rules.repetition_penalty)
            rows = [torch.unique(row) for row in prompts]
            width = max(len(r) for r in rows)
            self.seen = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])

    def next_tokens(self, logits: Any) -> Any:
        """``logits`` (batch, vocab) of the last position -> (batch,) token ids."""
        if self.processor is None:
            return logits.argmax(dim=-1)
        scores = self.processor(self.seen, logits.float())
        tokens = scores.argmax(dim=-1)
        self.seen = self._append(self.seen, tokens)
        return tokens

    @staticmethod
    def _append(seen: Any, tokens: Any) -> Any:
        import torch

        return torch.cat([seen, tokens[:, None]], dim=1)


def describe(rules: GreedyRules) -> str:
    """One line for the manifest: the processors that apply to greedy decoding."""
    return f"greedy ({', '.join(rules.applied) if rules.applied else 'plain argmax'})"


def decode(step: Callable[[Any], Any], stepper: GreedyStepper, next_tok: Any, max_new: int,
           ends: set[int]) -> list[Any]:
    """Greedy decode until every sequence has ended on one of ``ends`` or ``max_new`` tokens exist (``next_tok``,
    the prefill's, included). ``step(ids)`` runs the model on (batch, 1) ids and returns the (batch, vocab) logits.
    Returns the tokens per step, each (batch,).

    On CUDA the end check reads the flag of the token before the newest one, which is ready without waiting
    for the step in flight: the host queues step k+1 while the GPU runs step k, at the cost of at most one
    step past the end (its token is cut with everything after the end token). Every rank of a tp replica
    sees the same gathered logits, so all take the same number of steps.
    """
    import torch

    device = next_tok.device
    generated = [next_tok]
    eos = torch.tensor(sorted(ends), device=device) if ends else None
    lag = 1 if device.type == "cuda" else 0
    flags: list[tuple[Any, Any]] = []
    done = torch.zeros(next_tok.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new - 1):
        if eos is not None:
            done |= torch.isin(next_tok, eos)
            flags.append(_flag(done.all()))
            if len(flags) > lag and _read(flags[-1 - lag]):
                break
        next_tok = stepper.next_tokens(step(next_tok[:, None]))
        generated.append(next_tok)
    return generated


def _flag(value: Any) -> tuple[Any, Any]:
    """Start copying a 0-d bool tensor to the host; on CUDA without waiting for it."""
    import torch

    if value.device.type != "cuda":
        return None, value
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(value, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return event, host


def _read(flag: tuple[Any, Any]) -> bool:
    event, value = flag
    if event is not None:
        event.synchronize()
    return bool(value)

"""Which models the hf engine runs, and a check at load time that it computes what the model itself computes.

The engine keeps one key/value cache per decoder layer (:mod:`.cache`) and feeds prompts in chunks. That is right
for every layer that attends over keys and values: full, sliding-window (the model's own mask hides what is out of
the window) and chunked attention. Layers that keep a recurrent state instead (linear attention, Mamba-style state
spaces, convolutions: Qwen3-Next, Jamba, Falcon-H1, LFM2, MiniMax, RWKV) would be fed a cache they cannot use.
Those models are refused before loading, in one line.

For everything else, :func:`check_engine_matches_forward` compares, right after loading, the engine's chunked
prefill of a short probe (three chunks into the preallocated cache) with the model's own forward over the whole
probe: a family whose attention, cache use or rotary embedding the engine gets wrong is refused in one line
instead of being measured silently wrong. The probe is short (48 tokens, or past the smallest attention window
where that is short enough to compute at load: :func:`probe_length`), so it checks the plumbing and the window
layers, not RoPE scaling thresholds; those, and long windows, are covered by ``evalctx conformance``.
"""

from __future__ import annotations

from typing import Any

from evalctx.errors import UsageError

KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
"""transformers ``layer_types`` whose layers attend over cached keys and values."""

STATE_MODEL_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba",
                               "bamba", "zamba", "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid", "lfm2",
                               "lfm2_moe", "minimax", "qwen3_next", "kimi_linear", "olmo_hybrid",
                               "bailing_hybrid"})
"""Model types with recurrent-state layers that declare no ``layer_types`` the check above could read."""

PROBE_TOKENS = 48
PROBE_CHUNK = 16
WINDOW_PROBE_CAP = {"cuda": 8192, "cpu": 1024}
"""The longest window whose layers the probe exercises (it then spans the window and three chunks more, so the
window layers compact and hand their keys to the model's mask with an offset); longer windows are left to
``evalctx conformance``, since the reference forward over the whole probe costs more than a load should."""


def probe_length(backend: Any) -> tuple[int, str]:
    """Tokens of the load-time probe and a note on the window layers: 48, or past the smallest sliding or
    chunked window where that window is at most :data:`WINDOW_PROBE_CAP` for the device."""
    windows = sorted({w for w in (getattr(backend, "kv_windows", None) or ()) if w is not None})
    if not windows:
        return PROBE_TOKENS, ""
    w = windows[0]
    if w > WINDOW_PROBE_CAP.get(backend.device.type, WINDOW_PROBE_CAP["cpu"]):
        return PROBE_TOKENS, (f"; the window layers (window {w}) are longer than the probe: `evalctx conformance "
                              f"--model DIR --lengths {w // 2} {2 * w}` checks them")
    return max(PROBE_TOKENS, w + 3 * PROBE_CHUNK), f"; window layers of {w} exercised"


def check_supported(config: Any, model_name: str) -> None:
    """UsageError, in one line, for a model whose layers the engine's key/value cache cannot serve."""
    text = getattr(config, "text_config", None) or config
    model_type = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
    types = [str(t) for t in (getattr(text, "layer_types", None) or [])]
    other = sorted(set(types) - KV_LAYER_TYPES)
    if other or model_type in STATE_MODEL_TYPES:
        what = f"{', '.join(other)} layers" if other else f"model type {model_type}"
        raise UsageError(f"backend hf: {model_name} has {what} (a recurrent state, not keys and values), which "
                         f"evalctx's chunked KV-cache engine cannot run as the model does: evaluate it through "
                         f"--backend http with a server that runs it")


def tolerance(dtype: Any) -> float:
    """Relative error (L2 norm of the difference over the norm of the reference logits) allowed between the
    engine's and the model's own last-position logits: float32 differs only by summation order (~1e-6 seen);
    bf16/fp16 chunked attention against one forward differs by rounding (~1e-2 seen on random weights), while a
    wrong mask, cache or rotation gives errors of order 1."""
    import torch

    return 1e-3 if dtype == torch.float32 else 0.1


def check_engine_matches_forward(backend: Any) -> str:
    """Compare the engine's chunked prefill of a short probe with the model's own forward on the whole probe;
    UsageError when they differ beyond :func:`tolerance`. Returns the line the manifest keeps. Every rank of a
    tp replica runs it alike (the same collectives)."""
    import torch

    n, window_note = probe_length(backend)
    ids = _probe_ids(backend, n)
    model = backend.model
    limit = tolerance(backend.dtype)
    failures = (RuntimeError, ValueError, TypeError, IndexError, AttributeError, NotImplementedError, KeyError)
    with torch.inference_mode():
        backend.rope.reset()
        try:
            ref = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
        except failures as exc:
            raise UsageError(f"backend hf: {backend.model_name} fails its own forward pass (attention "
                             f"{backend.attn_implementation}): {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}") from exc
        # The model dtype: a quantized KV cache differs from the forward by design (what it costs is measured).
        cache = backend.new_cache(ids.shape[1], 1, quantized=False, step=PROBE_CHUNK)
        try:
            got = backend.prefill(ids, cache, chunk=PROBE_CHUNK).float()
        except failures as exc:
            raise UsageError(_refusal(backend, ids.shape[1], f"the chunked prefill failed: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")) from exc
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err <= limit:
        raise UsageError(_refusal(backend, ids.shape[1], f"relative logit error {err:.2g} > {limit:g}"))
    return (f"chunked prefill matches the model's forward: relative logit error {err:.1g} <= {limit:g} "
            f"({ids.shape[1]} tokens, chunks of {PROBE_CHUNK}{window_note})")


def _refusal(backend: Any, n: int, why: str) -> str:
    return (f"backend hf: evalctx's engine does not reproduce {backend.model_name}'s own forward ({why}, on a "
            f"{n}-token probe in chunks of {PROBE_CHUNK}, attention {backend.attn_implementation}): its numbers "
            f"would not be the model's; try attn_implementation=eager, or evaluate it through --backend http")


def _probe_ids(backend: Any, n: int = PROBE_TOKENS) -> Any:
    """A fixed probe of ``n`` ids in the run's tokenizer (text, repeated as needed)."""
    import torch

    text = "The grass is green. The sky is blue. The pass key is 71432. Remember it. What is the pass key? "
    ids = backend.ctx.tokenizer.encode(text * 4, add_special_tokens=True)
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor([ids[:n]], dtype=torch.long, device=backend.device)

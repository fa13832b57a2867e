"""Rotary embeddings of a chunked prefill as the model computes them on the whole prompt.

transformers recomputes the rotary frequencies of some RoPE types from the largest position of each forward call
(``dynamic_rope_update`` in ``modeling_rope_utils``): dynamic NTK scales its base to that length, and LongRoPE
switches from its short to its long factors once it passes ``original_max_position_embeddings``. On the whole
prompt (what ``generate`` does) every position is rotated with the frequencies of the prompt's length; in a chunked
prefill each chunk would be rotated with the frequencies of the chunk's own end, so the keys of one prompt would
mix several rotations (the first chunk with LongRoPE's short factors, later ones with the long ones). Dynamic NTK
also keeps the frequencies of the longest call so far, so a prompt's answer would depend on the prompts before it.

:class:`PromptRope` fixes both for any rotary module, whatever its RoPE type:

* while a prompt of ``n`` tokens is prefilled, every call of a rotary module gets one extra position, ``n - 1``,
  appended to its position ids, and that position's output is dropped: the frequency update sees the whole prompt's
  length and each chunk's positions are rotated exactly as in one forward over the whole prompt (the rotation of a
  position depends on nothing but that position and the frequencies);
* before each prompt the modules' state (frequencies, cached length, attention scaling) returns to what the model
  had when it was loaded, as a freshly loaded model's ``generate`` starts;
* decoding goes through the modules untouched, so each new token is rotated as ``generate`` rotates it.

:meth:`PromptRope.same_rotation` tells prefix reuse whether two prompt lengths rotate a shared prefix alike.
"""

from __future__ import annotations

from typing import Any, Callable


_INITIAL = "_evalctx_initial_state"
"""The attribute that keeps a wrapped module's state at load time (a private name: never snapshotted itself)."""


def _is_rotary(module: Any) -> bool:
    # transformers names every text rotary module <Family>RotaryEmbedding (LlamaRotaryEmbedding, Gemma3Rotary...,
    # Llama4TextRotaryEmbedding); vision rotary modules take pixel inputs, not position ids.
    name = type(module).__name__
    return name.endswith("RotaryEmbedding") and "Vision" not in name


class PromptRope:
    """Wraps every rotary module of ``model`` (see the module docstring); :meth:`start_prompt` and
    :meth:`end_prompt` bracket one prefill. One instance per model: a second one refuses with ValueError."""

    def __init__(self, model: Any) -> None:
        self.modules = [m for m in model.modules() if _is_rotary(m)]
        if any(hasattr(m, _INITIAL) for m in self.modules):
            raise ValueError("the rotary modules of this model are already wrapped")
        self._prompt_len: int | None = None
        for module in self.modules:
            module.forward = self._wrap(module.forward)
            setattr(module, _INITIAL, _snapshot(module))  # after wrapping: the wrapper is part of the state

    def _wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def rope_forward(x: Any, position_ids: Any, *args: Any, **kwargs: Any) -> Any:
            n = self._prompt_len
            if n is None or position_ids.dim() != 2:
                return forward(x, position_ids, *args, **kwargs)
            import torch

            last = position_ids.new_full((position_ids.shape[0], 1), n - 1)
            out = forward(x, torch.cat([position_ids, last], dim=-1), *args, **kwargs)
            return _drop_last_position(out, position_ids.shape[-1])

        return rope_forward

    def reset(self) -> None:
        """Return every rotary module to its state at load time."""
        for module in self.modules:
            _restore(module, getattr(module, _INITIAL))

    def start_prompt(self, n_tokens: int) -> None:
        """Before a prefill of ``n_tokens`` (the whole prompt, cached prefix included): reset, then rotate every
        chunk with the whole prompt's frequencies until :meth:`end_prompt`."""
        self.reset()
        self._prompt_len = n_tokens

    def end_prompt(self) -> None:
        """After the prefill: decoding steps update the frequencies as ``generate``'s do."""
        self._prompt_len = None

    def same_rotation(self, n_a: int, n_b: int, upto: int) -> bool:
        """Whether prompts of ``n_a`` and ``n_b`` tokens rotate positions ``0..upto-1`` alike, so a prefix cached
        for one is valid for the other. Asked of the modules themselves (positions 1 and ``upto - 1`` under each
        prompt length, every layer type), between prompts; leaves them reset."""
        if n_a == n_b or upto <= 1:
            return True
        same = all(_equal(_probe(m, n_a, upto), _probe(m, n_b, upto)) for m in self.modules)
        self.reset()
        return same


def _probe(module: Any, n: int, upto: int) -> list[Any]:
    """The module's output at positions 1 and ``upto - 1`` of a prompt of ``n`` tokens, from its load-time state:
    one output per layer type where the module keeps one RoPE per type (Gemma 3's sliding and full layers)."""
    import torch

    _restore(module, getattr(module, _INITIAL))
    buf = next(iter(module.buffers()), None)
    x = torch.zeros(1, dtype=torch.float32, device=buf.device if buf is not None else "cpu")
    positions = torch.tensor([[1, upto - 1, n - 1]], device=x.device)
    types = getattr(module, "rope_type", None)
    calls = [(t,) for t in types] if isinstance(types, dict) else [()]
    with torch.inference_mode():
        out = [_drop_last_position(module.forward(x, positions, *t), 2) for t in calls]
    _restore(module, getattr(module, _INITIAL))
    return out


def _drop_last_position(out: Any, keep: int) -> Any:
    """``out`` (a tensor, or a tuple/list of tensors, positions on dim -2) cut to its first ``keep`` positions."""
    if isinstance(out, (tuple, list)):
        return type(out)(_drop_last_position(t, keep) for t in out)
    return out[..., :keep, :]


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(torch.equal(a, b))


def _snapshot(module: Any) -> dict[str, Any]:
    """The state a frequency update may change: buffers, and plain tensor or number attributes (cached lengths,
    attention scaling, LongRoPE's long frequencies)."""
    import torch

    state: dict[str, Any] = {f"buffer:{k}": v.clone() for k, v in module._buffers.items() if v is not None}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, torch.Tensor):
            state[f"attr:{key}"] = value.clone()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            state[f"attr:{key}"] = value
    state["attrs"] = {k for k in vars(module) if not k.startswith("_")}
    return state


def _restore(module: Any, state: dict[str, Any]) -> None:
    import torch

    with torch.inference_mode():  # buffers an update replaced during a prefill are inference tensors
        _restore_state(module, state)


def _restore_state(module: Any, state: dict[str, Any]) -> None:
    import torch

    for key, value in state.items():
        if key == "attrs":
            continue
        kind, name = key.split(":", 1)
        if kind == "buffer":
            current = module._buffers.get(name)
            if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)  # in place: the buffer keeps its address
            else:
                module._buffers[name] = value.clone()
        elif isinstance(value, torch.Tensor):
            setattr(module, name, value.clone())
        else:
            setattr(module, name, value)
    # Attributes an update created after load (e.g. a per-layer-type cached length) go, as on a fresh model.
    for name in [k for k in vars(module) if not k.startswith("_") and k not in state["attrs"]]:
        delattr(module, name)

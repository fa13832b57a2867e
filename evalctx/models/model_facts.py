"""Facts of a Hugging Face model config as the manifest records them and the report shows them, the same under
transformers 4.x and 5.x.

transformers 5 moved ``rope_theta`` and ``rope_scaling`` into one ``rope_parameters`` dict (``{"rope_type":
"linear", "factor": 4.0, "rope_theta": 10000.0}``; per layer type for models such as Gemma 3), so
``config.rope_theta`` is gone and ``config.rope_scaling`` became an alias that carries ``rope_theta`` too. Manifests
written by evalctx before this module have ``rope_theta: null`` and that alias; :func:`rope_facts` reads both.
"""

from __future__ import annotations

from typing import Any, Mapping

# The model_config fields the hf backend records in the manifest (besides the rope facts).
SHAPE_FIELDS = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings")


def rope_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"rope_theta": ..., "rope_scaling": ...}`` of a model config (``config.to_dict()``) or of a manifest's
    ``model_config``, from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x).

    ``rope_theta``: the RoPE base, a float (a ``{layer_type: float}`` dict when it differs per layer type), or
    None when the config has none (not a rotary model). ``rope_scaling``: the scaling parameters without the base
    (``{"rope_type": "linear", "factor": 4.0}``), ``{"rope_type": "default"}`` or None for none."""
    params = config.get("rope_parameters")
    if not isinstance(params, Mapping):
        params = config.get("rope_scaling")  # 4.x, or the 5.x alias in an older evalctx manifest
    theta = config.get("rope_theta")
    scaling: Any = None
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        # One set per layer type (full vs sliding attention layers).
        thetas = {str(k): v.get("rope_theta", theta) for k, v in params.items()}
        theta = next(iter(thetas.values())) if len(set(map(str, thetas.values()))) == 1 else thetas
        scaling = {str(k): _without_theta(v) for k, v in params.items()}
    elif isinstance(params, Mapping):
        theta = params.get("rope_theta", theta)
        scaling = _without_theta(params)
    return {"rope_theta": theta, "rope_scaling": scaling or None}


def _without_theta(params: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in params.items() if k != "rope_theta"}


def rope_text(scaling: Any) -> str:
    """RoPE scaling as a short line: "none", "linear, factor 4", "yarn, factor 4, original_max_position_embeddings
    32768"; per layer type "full_attention: none; sliding_attention: linear, factor 8"."""
    if not scaling:
        return "none"
    if not isinstance(scaling, Mapping):
        return str(scaling)
    if all(isinstance(v, Mapping) for v in scaling.values()):
        return "; ".join(f"{k}: {rope_text(v)}" for k, v in scaling.items())
    kind = str(scaling.get("rope_type") or scaling.get("type") or "default")
    rest = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in scaling.items()
            if k not in ("rope_type", "type") and v is not None]
    return "none" if kind == "default" and not rest else ", ".join([kind, *rest])

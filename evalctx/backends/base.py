"""The backend contract, option parsing and the registry.

Backends are batch-first and synchronous: ``generate(batch)`` returns one result per request, same order. A backend
declares how many MPI ranks one replica of it needs; every rank of a replica calls ``generate`` with the same batch
(the TensorRT-LLM tensor-parallel pattern) and only the replica leader's results are used.
Heavy imports happen inside the backend module that needs them, never here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from evalctx.errors import UsageError
from evalctx.records import GenerationRequest, GenerationResult, Sample
from evalctx.registry import load_registered


@dataclass
class BackendContext:
    """Where a backend instance lives in the MPI world and what it must know to load."""

    model: str | None = None
    """Model or engine directory, or an embedded name; backend-specific."""
    tokenizer: Any = None
    """The :class:`evalctx.models.tokenizer.Tokenizer` that built the prompts."""
    world_rank: int = 0
    world_size: int = 1
    replica: int = 0
    rank_in_replica: int = 0
    replica_comm: Any = None
    """mpi4py communicator of this replica's ranks (None in a single process)."""
    max_input_len: int | None = None
    """Longest prompt of the run, in tokens (engines size their runtime buffers from it)."""
    max_new_tokens: int | None = None
    """Largest generation budget of the run."""


class Backend:
    """Base class; subclasses set ``name`` and ``Options`` and implement ``generate``."""

    name: ClassVar[str] = "base"
    resume_free: ClassVar[tuple[str, ...]] = ()
    """Options that change no number (checks): left out of the run's identity, so a resume may change them."""

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any, ctx: BackendContext) -> None:
        self.options = options
        self.ctx = ctx

    @classmethod
    def ranks_per_replica(cls, options: Any, model: str | None) -> int:
        """How many MPI ranks one replica needs (TensorRT-LLM: tp*pp of the engine)."""
        return 1

    @classmethod
    def default_label(cls, options: Any, model: str | None) -> str | None:
        """The run's label when --label is not given (None: the model directory's name, else the backend's)."""
        return None

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError

    def preflight(self, samples: Sequence[Sample]) -> dict[str, str]:
        """Sample ids this backend cannot run, with a one-line reason; checked before any generation."""
        return {}

    def limits(self) -> Any:
        """The :class:`evalctx.capacity.preflight.EngineLimits` of the engine and model, or None when unknown (the runner
        flags rows beyond a rotary model's stated window from them)."""
        return None

    def info(self) -> dict[str, Any]:
        """Backend, model and engine facts for the manifest."""
        return {"backend": self.name, "options": dataclasses.asdict(self.options)}

    def identity(self) -> dict[str, Any]:
        """What the engine or server says it runs, beyond what the run's configuration and the model files'
        fingerprint fix (a server's checkpoint behind an unchanged URL and model name, its version): flat
        ``{field: value}``. A resume refuses when a field the run started with has another value now."""
        return {}

    def row_columns(self) -> dict[str, Any]:
        """Constant columns added to every row (engine configuration, model name)."""
        return {"backend": self.name}

    def close(self) -> None:
        pass


# name -> "module:Class"; imported only when chosen, so `import evalctx` stays light.
REGISTRY: dict[str, str] = {
    "fake": "evalctx.backends.fake:FakeBackend",
    "fake-tp": "evalctx.backends.fake:FakeTPBackend",
    "hf": "evalctx.backends.hf:HFBackend",
    "trtllm": "evalctx.backends.trtllm.backend:TRTLLMBackend",
    "trtllm-llm": "evalctx.backends.trtllm.llm_api:TRTLLMAPIBackend",
    "http": "evalctx.backends.openai_http:HTTPBackend",
}


def backend_class(name: str) -> type[Backend]:
    return load_registered(REGISTRY, name, "backend")


def _coerce(value: Any, typ: Any, key: str, backend: str) -> Any:
    """Turn a ``key=value`` string (or a TOML value) into the option's declared type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, backend)
            except UsageError:
                continue
        raise UsageError(f"backend {backend}: option {key}={value!r} has the wrong type (want {typ})")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        return [_coerce(v, args[0] if args else str, key, backend) for v in items]
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"backend {backend}: option {key}={value!r} must be true or false")
    if typ in (int, float):
        if isinstance(value, bool):
            raise UsageError(f"backend {backend}: option {key}={value!r} must be a number")
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise UsageError(f"backend {backend}: option {key}={value!r} must be {typ.__name__}") from None
    if typ is str:
        return str(value)
    if typ is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise UsageError(f"backend {backend}: option {key} must be a table in the suite file")
    return value


def parse_options(cls: type[Backend], raw: Mapping[str, Any]) -> Any:
    """Build ``cls.Options`` from a mapping; unknown keys are errors that list the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        k = key.replace("-", "_")
        if k not in fields:
            known = ", ".join(sorted(fields)) or "(none)"
            raise UsageError(f"backend {cls.name}: unknown option {key!r}; known options: {known}")
        values[k] = _coerce(value, hints[k], k, cls.name)
    from evalctx import redact

    for key, value in values.items():
        if redact.is_secret_key(key):
            redact.remember(value)  # a server that quotes it back in an error must not get it stored
    return cls.Options(**values)


def parse_kv_flags(flags: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> dict; one option per flag, the value may itself contain ``=`` or ``,``."""
    out: dict[str, str] = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"backend option {flag!r} must be key=value (one option per --backend-opt flag)")
        out[key.strip()] = value
    return out


_BLOCK = 4096
"""Tokens compared per slice in :func:`common_prefix` (C-speed comparison; only the last block is walked)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences (0 when the first ids differ): what a
    backend's prefix cache can keep, and what the runner orders prompts by (:mod:`evalctx.run.prefix_order`)."""
    n = min(len(a), len(b))
    i = 0
    while i < n:
        j = min(i + _BLOCK, n)
        if a[i:j] != b[i:j]:
            while a[i] == b[i]:
                i += 1
            return i
        i = j
    return n

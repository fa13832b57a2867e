"""evalctx: token-exact long-context evaluation (passkey, needle-in-a-haystack) for LLMs.

Importing this package is light: numpy/pandas-free at import time; torch, transformers, mpi4py, matplotlib and
tensorrt_llm are imported only by the module that uses them.
"""

from evalctx.errors import LengthError, UsageError
from evalctx.records import GenerationRequest, GenerationResult, Sample, SampleRecord, Score
from evalctx.registry import lazy_attributes

__version__ = "0.1.0"

# Analysis entry points, imported on first use so that `import evalctx` never loads pandas or matplotlib.
_LAZY = {
    "load_run": "evalctx.analysis.runs",
    "load_runs": "evalctx.analysis.runs",
    "effective_length": "evalctx.analysis.runs",
    "suite_average": "evalctx.analysis.runs",
    "suite_effective_length": "evalctx.analysis.runs",
    "summarize": "evalctx.results.summary",
    "compare": "evalctx.analysis.compare",
    "write_report": "evalctx.report.render",
    "load_suite": "evalctx.config",
    "load_tokenizer": "evalctx.models.tokenizer",
    "get_task": "evalctx.tasks",
}

__getattr__ = lazy_attributes("evalctx", _LAZY)


def __dir__() -> list[str]:
    # The lazy names are attributes too: tab completion and dir() should offer them.
    return sorted({*globals(), *_LAZY})

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "LengthError",
    "Sample",
    "SampleRecord",
    "Score",
    "UsageError",
    "__version__",
    *_LAZY,
]

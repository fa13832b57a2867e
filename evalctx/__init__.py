"""evalctx: token-exact long-context evaluation (passkey, needle-in-a-haystack) for LLMs.

Importing this package is light: numpy/pandas-free at import time; torch, transformers, mpi4py, matplotlib and
tensorrt_llm are imported only by the module that uses them.
"""

from evalctx.errors import LengthError, UsageError
from evalctx.records import GenerationRequest, GenerationResult, Sample, SampleRecord, Score

__version__ = "0.1.0"

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "LengthError",
    "Sample",
    "SampleRecord",
    "Score",
    "UsageError",
    "__version__",
]

"""The engine-independent parts of the TensorRT-LLM backend: keywords across releases, error triage, MPI placement.

Rank rule (what TensorRT-LLM does, and what evalctx does about it). ``ModelRunnerCpp.from_dir`` builds
``WorldConfig.mpi`` over TensorRT-LLM's MPI *session* (MPI_COMM_WORLD unless changed), checks that the session
size equals the engine's tp*pp*cp, and asserts ``rank == session rank``. The executor then runs the rank on
``device_ids[rank % len(device_ids)]``, where ``device_ids`` defaults to ``0..gpus_per_node-1``. So:

* one replica (``mpirun -n tp*pp``): rank = world rank, and TensorRT-LLM picks the GPU as it always does;
* several replicas in one MPI world: both session communicators (the C++ one and tensorrt_llm's Python
  ``mpi_comm()``, over which ``from_dir`` broadcasts the PEFT cache config) are pointed at the replica's
  communicator, rank = rank within the replica, and ``device_ids`` lists, in replica-rank order, the GPU each
  member owns: its node-local MPI rank. A replica spanning nodes keeps TensorRT-LLM's ``rank % gpus_per_node``.

None of this has run on a real multi-replica job yet; the single-replica path is the one the README recipe uses.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable

from evalctx.errors import UsageError

log = logging.getLogger("evalctx.backends.trtllm")

# Errors after which the executor's CUDA state cannot be trusted: they end the run instead of becoming error rows.
FATAL_MARKERS = ("cuda error", "cudaerror", "cuda runtime error", "illegal memory access", "out of memory",
                 "nccl", "cublas", "device-side assert", "unspecified launch failure", "ecc error")
LOCAL_RANK_ENV = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


def filter_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any],
                  passthrough: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """Split ``kwargs`` into those ``fn`` accepts and the names it lacks.

    Names in ``passthrough`` are kept when ``fn`` has ``**kwargs`` (generate's sampling options); any other name
    must be a named parameter, because ``**kwargs`` would silently swallow what it does not know.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a binding without a signature: pass everything and let it complain
        return dict(kwargs), []
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    kept = {k: v for k, v in kwargs.items() if k in named or (var_kw and k in passthrough)}
    return kept, [k for k in kwargs if k not in kept]


def is_fatal(exc: BaseException) -> bool:
    """CUDA, NCCL and out-of-memory errors: the process state is suspect, so they propagate and end the run."""
    if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
        return True
    text = str(exc).lower()
    return any(m in text for m in FATAL_MARKERS)


def local_gpu(world_rank: int, gpus_per_node: int) -> int:
    """The GPU a rank owns: its node-local MPI rank (launcher variables), else world rank modulo GPUs per node."""
    for name in LOCAL_RANK_ENV:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return world_rank % max(1, gpus_per_node)


def session_comm(replica_comm: Any, ranks_per_replica: int) -> Any:
    """The replica's communicator; dist.py makes none for one-rank replicas, whose session is then COMM_SELF."""
    if replica_comm is None and ranks_per_replica == 1:
        from mpi4py import MPI

        return MPI.COMM_SELF
    return replica_comm


def use_replica_session(comm: Any, *, replica: int, rank: int, version: str | None, replicas: int,
                        ranks_per_replica: int) -> None:
    """Point TensorRT-LLM's MPI session at ``comm`` so WorldConfig sees this replica's ranks, not the world."""
    try:
        from tensorrt_llm import _utils as trt_utils
        from tensorrt_llm.bindings import MpiComm
    except ImportError:
        trt_utils = MpiComm = None
    can_cpp = hasattr(MpiComm, "set_raw_mpi_session_by_fortran_handle") or hasattr(MpiComm, "split")
    if comm is None or not hasattr(trt_utils, "set_mpi_comm") or not can_cpp:
        raise UsageError(f"tensorrt_llm {version} cannot run {replicas} replicas in one MPI world: "
                         f"run one replica per mpirun (-n {ranks_per_replica})")
    trt_utils.set_mpi_comm(comm)
    if hasattr(MpiComm, "set_raw_mpi_session_by_fortran_handle"):
        MpiComm.set_raw_mpi_session_by_fortran_handle(comm.py2f())
    else:
        MpiComm.split(replica, rank)  # collective over the world: every rank constructs the backend together


def replica_device_ids(comm: Any, world_rank: int, gpus_per_node: int, warn: bool) -> list[int] | None:
    """The GPU of each replica member in rank order, or None (TensorRT-LLM's default) when it spans nodes."""
    ids = [int(i) for i in comm.allgather(local_gpu(world_rank, gpus_per_node))]
    if len(set(ids)) != len(ids) or max(ids) >= gpus_per_node:
        if warn:
            log.warning("replica spans nodes (local GPUs %s): keeping TensorRT-LLM's rank %% gpus_per_node", ids)
        return None
    return ids


def synchronize(torch: Any) -> None:
    """Wait for the GPU so latency covers the work, not just the launch (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()

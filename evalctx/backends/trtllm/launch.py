"""Where one replica's ranks run: the participant ids and device ids handed to the executor's ``ParallelConfig``.

What TensorRT-LLM does at start-up (read in ``cpp/tensorrt_llm/executor/executorImpl.cpp``, ``initializeWorkers``,
the version indexed as commit 036a60f7, and ``cpp/tensorrt_llm/runtime/worldConfig.cpp``):

* Without participant ids it requires ``MPI_COMM_WORLD``'s size to equal the engine's tp*pp*cp ("With
  communicationMode kLEADER, MPI worldSize is expected to be equal to tp*pp*cp when participantIds are not
  specified"). Several replicas in one ``mpirun`` therefore fail on every rank unless ids are given.
* With participant ids (world ranks, exactly tp*pp*cp of them) it builds its own session communicator over those
  ranks (``MPI_Comm_create_group`` on ``MPI_COMM_WORLD``, tag 1000 + the first id) and makes it the session; the
  first id is the leader, the only rank that may enqueue requests. With pp > 1 the id list is reversed, and each
  group of tp ids reversed back, before the group is formed, so session ranks do not follow the id order.
* The engine file (``rank{r}.engine``) and the GPU follow the session rank r: ``device_ids[r % len(device_ids)]``,
  where device ids default to ``0 .. gpus_per_node-1`` and, when given, must be tp*pp*cp unique ids below the
  engine's ``gpus_per_node``.

evalctx therefore passes, for each replica of a multi-replica world, the replica's world ranks as participant ids
and, when the replica sits on one node, the node-local GPU of each member in session-rank order. A single replica
spanning the whole world keeps TensorRT-LLM's defaults (no ids), the path its own scripts take. A rank whose
node-local index is not below the engine's ``gpus_per_node`` has no GPU of its own to get (the executor refuses such
device ids, and its default would put the replica on a GPU another replica uses), so that is a usage error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from evalctx.errors import UsageError

log = logging.getLogger("evalctx.backends.trtllm")

LOCAL_RANK_ENV = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


@dataclass(frozen=True)
class Placement:
    """How one rank joins its replica's executor."""

    participant_ids: list[int] | None
    """World ranks of the replica, leader first; None = TensorRT-LLM's default (the world is one replica)."""
    device_ids: list[int] | None
    """GPU of each session rank; None = TensorRT-LLM's default (session rank modulo gpus_per_node)."""
    device: int | None
    """The GPU this rank will use, when known."""


def local_gpu(world_rank: int, gpus_per_node: int) -> int:
    """The GPU a rank owns: its node-local MPI rank (launcher variables), else world rank modulo GPUs per node."""
    for name in LOCAL_RANK_ENV:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return world_rank % max(1, gpus_per_node)


def session_order(participant_ids: list[int], tp: int, pp: int) -> list[int]:
    """World ranks in the order of their executor session ranks (executorImpl.cpp reorders for pp > 1)."""
    ids = list(participant_ids)
    if pp > 1:
        ids.reverse()
        if tp > 1:
            ids = [i for start in range(0, len(ids), tp) for i in reversed(ids[start:start + tp])]
    return ids


def place(*, world_rank: int, world_size: int, ranks_per_replica: int, replica_comm: Any, tp: int, pp: int,
          gpus_per_node: int) -> Placement:
    """Participant and device ids for this rank's replica.

    ``replica_comm`` is the mpi4py communicator of the replica (None for one-rank replicas); it is used for one
    allgather, so every rank of the replica must call this together.
    """
    if world_size == ranks_per_replica:
        return Placement(participant_ids=None, device_ids=None, device=None)
    mine = (world_rank, local_gpu(world_rank, gpus_per_node))
    members = [tuple(m) for m in replica_comm.allgather(mine)] if replica_comm is not None else [mine]
    crowded = [(rank, gpu) for rank, gpu in members if gpu >= gpus_per_node]
    if crowded:
        rank, gpu = crowded[0]
        raise UsageError(f"rank {rank} is rank {gpu} of its node, but the engine was built for {gpus_per_node} GPUs "
                         f"per node (mapping.gpus_per_node): replicas would share GPUs and their timings would be "
                         f"wrong; run at most {gpus_per_node} ranks per node, or rebuild with --gpus_per_node")
    gpu_of = dict(members)
    participants = [rank for rank, _ in members]  # replica-rank order: the leader (replica rank 0) first
    order = session_order(participants, tp, pp)
    devices = [gpu_of[rank] for rank in order]
    if len(set(devices)) != len(devices):
        # A replica over several nodes: its local GPUs repeat. TensorRT-LLM's default (session rank modulo
        # gpus_per_node) is right when each node holds whole, contiguous groups of its ranks.
        if world_rank == participants[0]:
            log.warning("replica %s spans nodes (local GPUs %s): keeping TensorRT-LLM's session rank %% gpus_per_node",
                        participants, devices)
        return Placement(participant_ids=participants, device_ids=None, device=None)
    return Placement(participant_ids=participants, device_ids=devices, device=gpu_of[world_rank])


def visible_gpus(value: str) -> int:
    """GPUs a ``CUDA_VISIBLE_DEVICES`` value makes visible: its entries up to the first empty or negative one (CUDA
    ignores an invalid entry and every entry after it; ``""`` and ``-1`` hide every GPU)."""
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        count += 1
    return count


def executor_device(placement: Placement, *, world_rank: int, tp: int, pp: int, gpus_per_node: int) -> int:
    """The CUDA device index this rank's executor selects: the placement's device id, else TensorRT-LLM's default
    ``session rank % gpus_per_node`` (session rank = world rank without participant ids, else the rank's place in
    the executor's session order)."""
    if placement.device is not None:
        return placement.device
    if placement.participant_ids is None:
        return world_rank % max(1, gpus_per_node)
    return session_order(placement.participant_ids, tp, pp).index(world_rank) % max(1, gpus_per_node)


def check_visible(device: int, world_rank: int, env: Any = None) -> None:
    """UsageError when this rank's ``CUDA_VISIBLE_DEVICES`` hides the device index its executor will select.

    A launcher that gives each rank its own GPU (``CUDA_VISIBLE_DEVICES=$LOCAL_RANK``) leaves one visible device,
    index 0, while the executor selects ``device`` (its local GPU number): ``cudaSetDevice`` would fail deep inside
    the engine load with "invalid device ordinal". Unset means every GPU is visible.
    """
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return
    visible = visible_gpus(value)
    if device >= visible:
        raise UsageError(f"rank {world_rank}: TensorRT-LLM will select GPU {device} but CUDA_VISIBLE_DEVICES="
                         f"{value!r} leaves this rank {visible} visible: unset CUDA_VISIBLE_DEVICES in the per-rank "
                         "launcher (the executor picks each rank's GPU itself) or give every rank the same full list")

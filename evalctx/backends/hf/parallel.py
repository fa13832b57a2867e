"""Tensor parallelism for the hf backend: one torch.distributed process group per replica, transformers' tp plan.

evalctx's MPI world is R replicas x K ranks (:mod:`evalctx.run.dist`). Each replica's K ranks form their own
torch.distributed default group (world size K, rank = rank in the replica): transformers' ``tp_plan="auto"``
shards over the default group's whole world, so a group per replica is what lets ``mpirun -n 4 ...
--backend-opt tp=2`` run two independent 2-way replicas. The replica leader opens the rendezvous store on a free
port and tells its followers over MPI, so nothing depends on MASTER_ADDR/MASTER_PORT or a fixed port.

NCCL on CUDA, gloo on CPU. NCCL's NVLink-multicast switches (NCCL_NVLS_ENABLE and friends) are read from the
environment as the launcher set them: nothing here sets or clears them.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from evalctx.errors import UsageError

# Prefill of one 1M-token prompt on a 70B-class model runs for many minutes between two collectives of the slowest
# rank only in pathological cases; the default 10 minutes would turn a slow sample into a killed job.
_TIMEOUT = timedelta(hours=2)


def local_rank() -> int:
    """This process's rank among the ranks on its host, as the launcher announced it (0 when unknown)."""
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def init_replica_group(replica_comm: Any, rank_in_replica: int, tp: int, device: Any) -> None:
    """Join this replica's torch.distributed group (world size ``tp``); ``replica_comm`` is its mpi4py communicator.

    Raises :class:`UsageError` when the replica has no communicator (not launched under mpirun) or its size is not
    ``tp``.
    """
    import torch
    import torch.distributed as dist

    if replica_comm is None or replica_comm.Get_size() != tp:
        have = 1 if replica_comm is None else replica_comm.Get_size()
        raise UsageError(f"backend hf: tp={tp} needs {tp} MPI ranks per replica, this replica has {have}: "
                         f"launch with mpirun -n {tp} (or a multiple of it)")
    if dist.is_initialized():
        if dist.get_world_size() != tp:
            raise UsageError(f"backend hf: torch.distributed is already initialised with world size "
                             f"{dist.get_world_size()}, not tp={tp}")
        return
    host = socket.gethostname()
    store = None
    if rank_in_replica == 0:
        store = dist.TCPStore(host, 0, tp, is_master=True, timeout=_TIMEOUT, wait_for_workers=False)
        where = (host, store.port)
    else:
        where = None
    leader_host, port = replica_comm.bcast(where, root=0)
    if store is None:
        # Ranks on the leader's host connect over loopback, which needs no name resolution.
        addr = "127.0.0.1" if leader_host == host else leader_host
        store = dist.TCPStore(addr, port, tp, is_master=False, timeout=_TIMEOUT)
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank_in_replica,
                            world_size=tp, timeout=_TIMEOUT, **kwargs)
    # transformers binds the tp device from LOCAL_RANK: make it the GPU this rank already chose.
    os.environ["LOCAL_RANK"] = str(device.index or 0)


def tp_load_kwargs(tp: int) -> dict[str, Any]:
    """``from_pretrained`` arguments for transformers' own tensor parallelism over the replica group."""
    try:
        from transformers import DistributedConfig
    except ImportError:  # transformers before DistributedConfig took tp_plan directly
        return {"tp_plan": "auto", "tp_size": tp}
    return {"distributed_config": DistributedConfig(tp_size=tp, tp_plan="auto")}


def check_divides(cfg: Any, tp: int) -> None:
    """tp must split the attention and KV heads evenly (transformers shards q/k/v projections by columns)."""
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads is None:
        return
    if heads % tp or kv % tp:
        raise UsageError(f"backend hf: tp={tp} must divide the model's {heads} attention heads and {kv} KV heads; "
                         f"choose tp from {[t for t in range(1, heads + 1) if heads % t == 0 and kv % t == 0]}")


def close_replica_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

"""The MPI world: N ranks = R replicas x K ranks per replica, with a single-process fallback that imports no MPI.

Rank 0 of each replica (its leader) owns the replica's samples and broadcasts each batch to its followers; only
leaders score and journal; world rank 0 gathers and writes. Any exception on any rank aborts the whole world, so
a job never hangs waiting for a rank that died.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from evalctx.errors import UsageError

_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
TAG_PROGRESS = 71
TAG_DONE = 72


def launched_size() -> int:
    """World size as the launcher announced it in the environment (no MPI import needed to read it)."""
    for var in _SIZE_VARS:
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 1


@dataclass
class World:
    rank: int = 0
    size: int = 1
    ranks_per_replica: int = 1
    comm: Any = None
    replica_comm: Any = None

    @property
    def replica(self) -> int:
        return self.rank // self.ranks_per_replica

    @property
    def rank_in_replica(self) -> int:
        return self.rank % self.ranks_per_replica

    @property
    def n_replicas(self) -> int:
        return self.size // self.ranks_per_replica

    @property
    def is_leader(self) -> bool:
        return self.rank_in_replica == 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.comm is not None

    def leader_of(self, replica: int) -> int:
        return replica * self.ranks_per_replica

    # --- collectives (no-ops in one process) ---------------------------------------------------------------
    def bcast_replica(self, obj: Any) -> Any:
        if self.replica_comm is None or self.ranks_per_replica == 1:
            return obj
        return self.replica_comm.bcast(obj, root=0)

    def bcast_world(self, obj: Any) -> Any:
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def send_to_root(self, obj: Any, tag: int) -> None:
        if self.comm is not None and not self.is_root:
            self.comm.send(obj, dest=0, tag=tag)

    def poll_root(self, tag: int) -> list[Any]:
        """Messages with ``tag`` that have arrived at rank 0, without blocking."""
        out: list[Any] = []
        if self.comm is None:
            return out
        from mpi4py import MPI

        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=tag):
            out.append(self.comm.recv(source=MPI.ANY_SOURCE, tag=tag))
        return out

    def recv_root(self, tag: int) -> Any:
        from mpi4py import MPI

        return self.comm.recv(source=MPI.ANY_SOURCE, tag=tag)

    def abort(self, code: int) -> None:
        """End every rank now. Open MPI's mpirun then exits non-zero; buffered output is flushed first."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None:
            self.comm.Abort(code)
        raise SystemExit(code)


def abort_if_distributed(code: int) -> None:
    """After an error in a multi-rank job: end every rank now, since the others may wait in a collective."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(code)


def init_world(ranks_per_replica: int = 1) -> World:
    """Join the MPI world if the launcher started more than one rank; otherwise stay a single process."""
    size = launched_size()
    if size <= 1:
        if ranks_per_replica > 1:
            raise UsageError(
                f"this backend needs {ranks_per_replica} ranks per replica (tensor/pipeline parallel): "
                f"launch with mpirun -n {ranks_per_replica} (or a multiple of it)"
            )
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError(f"launched with {size} ranks but mpi4py is missing: pip install 'evalctx[mpi]'") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size % ranks_per_replica:
        raise UsageError(
            f"world size {size} is not a multiple of the {ranks_per_replica} ranks one replica needs: "
            f"use mpirun -n {ranks_per_replica * max(1, size // ranks_per_replica)}"
        )
    world = World(rank=rank, size=size, ranks_per_replica=ranks_per_replica, comm=comm)
    world.replica_comm = comm.Split(color=world.replica, key=rank) if ranks_per_replica > 1 else None
    _install_abort_hook(world)
    return world


def _install_abort_hook(world: World) -> None:
    """An uncaught exception on any rank ends all ranks at once, naming the rank."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if isinstance(exc, UsageError):
            print(f"evalctx: error on rank {world.rank}: {exc}", file=sys.stderr)
            code = 2
        else:
            traceback.print_exception(exc_type, exc, tb)
            print(f"evalctx: rank {world.rank} failed: {exc_type.__name__}: {exc}", file=sys.stderr)
            code = 1
        world.abort(code)

    sys.excepthook = hook

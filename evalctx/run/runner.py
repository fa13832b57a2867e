"""The evaluation loop: shard specs over replicas, build prompts where they run, generate, score, journal, gather.

Every rank runs ``run()``. Leaders build and broadcast batches, followers only generate; world rank 0 also writes
the manifest, the unsupported rows, the merged table and the summary. Resume is by sample id across journals, so a
rerun with any rank count finishes the same run with nothing lost or doubled.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalctx import redact
from evalctx.backends.base import Backend, BackendContext, backend_class, parse_options
from evalctx.capacity.limits import check_suite
from evalctx.config import Suite, config_hash
from evalctx.errors import LengthError, RefusedBeforeWork, RunFailed, UsageError
from evalctx.models import chat_identity
from evalctx.models.fingerprint import changed_files, model_fingerprint
from evalctx.models.tokenizer import Tokenizer, load_tokenizer
from evalctx.records import SCHEMA_VERSION, GenerationRequest, Sample
from evalctx.results import journal as journals
from evalctx.results import lock, prompts, rundir
from evalctx.run.closing import close_run
from evalctx.run.dist import TAG_DONE, TAG_PROGRESS, World, init_world
from evalctx.run.environment import git_sha, gpus, versions
from evalctx.run.interrupts import signal_name
from evalctx.run.prefix_order import order_by_prefix, prefix_windows
from evalctx.run.progress import Progress
from evalctx.run.rows import make_record, unsupported_record
from evalctx.run.sampling import SampleBuilder, SampleSpec
from evalctx.run.schedule import batches, shard
from evalctx.run.status import FAILED, INTERRUPTED, RUNNING


class IdentityChanged(RefusedBeforeWork):
    """A resume found the engine or server answering as another model than the run was started with."""


@dataclass
class RunConfig:
    suite: Suite
    backend: str
    backend_options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    tokenizer: str | None = None
    """Tokenizer spec; defaults to the model directory."""
    out_dir: Path = Path("results")
    run_id: str | None = None
    label: str | None = None
    batch_size: int | None = None
    retry_errors: bool = True
    progress: bool = True
    command: str = ""
    max_error_rate: float = 0.0
    """Share of error rows (0..1) a complete run may have and still be ``complete`` (exit 0); above it the run is
    ``complete_with_errors`` (exit 3)."""
    log_samples: str | None = None
    """``excerpt`` or ``full``: also keep each prompt in prompts/ (see results.prompts); None: only its hash."""
    chat_date: _dt.date | None = None
    """The day chat templates see as today (--chat-date); None: the day the run was created (kept on resume)."""


@dataclass
class RunOutcome:
    run_dir: Path
    n_total: int
    n_new: int
    status: str
    summary: Any = None
    """pandas DataFrame (rank 0 only)."""


class Runner:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.cls: type[Backend] = backend_class(cfg.backend)
        suite_opts = cfg.suite.backend_options if cfg.suite.backend in (None, cfg.backend) else {}
        self.options = parse_options(self.cls, {**suite_opts, **cfg.backend_options})
        k = self.cls.ranks_per_replica(self.options, cfg.model)
        self.world: World = init_world(k)
        tok_spec = cfg.tokenizer or cfg.model
        if tok_spec is None:
            raise UsageError(f"backend {cfg.backend} needs --tokenizer (or --model with tokenizer files)")
        self.tokenizer: Tokenizer = load_tokenizer(tok_spec)
        check_suite(cfg.suite)
        self.label = cfg.label or self.cls.default_label(self.options, cfg.model) \
            or (Path(cfg.model).name if cfg.model else cfg.backend)
        # What the model directory holds, not only its name: a config.json edited in place is another run.
        self.model_fingerprint = model_fingerprint(cfg.model)
        self.config = {
            "suite": {k2: v for k2, v in cfg.suite.to_json().items() if k2 not in ("path", "model", "backend",
                                                                                   "batch_size")},
            "backend": cfg.backend,
            # A rotated API key is the same run; checks that change no number (verify_greedy) may change on resume.
            "backend_options": {k: v for k, v in redact.mask(dataclasses.asdict(self.options)).items()
                                if k not in self.cls.resume_free},
            "model": cfg.model,
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            "model_fingerprint": self.model_fingerprint["digest"] if self.model_fingerprint else None,
        }
        self.config_hash = config_hash(self.config)
        # Run ids are names: the run dir is always directly under --out.
        self.run_id = rundir.check_name(cfg.run_id, "--run-id") if cfg.run_id is not None else \
            f"{rundir.check_name(cfg.suite.name, 'suite name')}-{rundir.safe_name_part(Path(self.label).name)}-" \
            f"{self.config_hash}"
        self.run_dir = Path(cfg.out_dir) / self.run_id
        # Chat templates that write the date see the day the run was created, on every resume (decided by rank 0:
        # ranks started around midnight must not build different prompts).
        day = self._chat_day() if self.world.is_root else None
        self.tokenizer.chat_date = self.world.bcast_world(day)
        self.chat_template = chat_identity.describe(self.tokenizer) if self._uses_chat() else None
        self.builder = SampleBuilder(cfg.suite, self.tokenizer)
        self.builder.check_min_lengths()
        self.specs = self.builder.specs()
        if self.world.is_root:
            for warning in self.builder.budget_warnings():
                print(f"evalctx: warning: {warning}", file=sys.stderr)
        self.attempt_id = ""
        """This command's hold on the run dir (see results.lock); written into the manifest."""
        self._backend_info: dict[str, Any] = {"backend": cfg.backend}
        self._old_manifest: dict[str, Any] | None = None
        self.identity: dict[str, Any] | None = None
        """What the backend says it runs (:meth:`Backend.identity`), once known."""
        self._noted: set[str] = set()
        self.batch_size = cfg.batch_size or cfg.suite.batch_size

    def _check_identity(self, backend: Backend) -> None:
        """World rank 0, before any generation: refuse a resume whose engine or server now states another identity
        than the run was started with (a checkpoint swapped behind the same URL and model name), naming what
        changed, and put the run's manifest back as it was; record the identity otherwise."""
        self.identity = backend.identity()
        before = (self._old_manifest or {}).get("identity")
        if not isinstance(before, dict):
            return
        # Fields read on both sides only: a /version that did not answer this time is no other server.
        changed = {k: (before[k], self.identity[k]) for k in before
                   if k in self.identity and before[k] != self.identity[k]}
        if not changed:
            return
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise IdentityChanged(f"run dir {self.run_dir} was started against another {self.cfg.backend} model or "
                              f"server than the one answering now ({what}): its numbers would mix the two; pass "
                              f"--run-id NEW for a run of this one")

    def _chat_day(self) -> Any:
        """The day this run's chat templates see: the one its manifest pinned, else --chat-date, else today. A
        --chat-date other than the pinned day is refused: the run would hold prompts of two days."""
        old = self._read_old_manifest()
        pinned = ((old or {}).get("chat_template") or {}).get("date")
        given = self.cfg.chat_date
        if pinned and given is not None and given.isoformat() != pinned:
            raise UsageError(f"run dir {self.run_dir} holds chat prompts rendered for {pinned}: --chat-date "
                             f"{given.isoformat()} would mix two days' prompts; drop --chat-date to resume, or pass "
                             "--run-id NEW")
        return chat_identity.pinned_date(old, given)

    def _uses_chat(self) -> bool:
        return any(t.prompt_mode == "chat" for t in self.cfg.suite.tasks)

    def _read_old_manifest(self) -> dict[str, Any] | None:
        """The run dir's manifest before this command touches it, or None (no run yet, or unreadable: the checks
        in :meth:`_open_run_dir` report that)."""
        try:
            return rundir.read_manifest(self.run_dir)
        except (UsageError, OSError):
            return None

    # ------------------------------------------------------------------------------------------------------
    def _journal_rows(self) -> dict[str, dict[str, Any]]:
        """This configuration's journaled rows by sample id; what had to be skipped is said once, on stderr."""
        problems: list[str] = []
        rows = journals.read_journals(self.run_dir, self.config_hash, problems)
        for p in problems:
            if p not in self._noted:
                self._noted.add(p)
                print(f"evalctx: warning: {redact.mask_text(p)}", file=sys.stderr)
        return rows

    def _pending_ids(self) -> list[str]:
        """Spec ids without a finished journal row (error rows count as unfinished when retrying)."""
        done = self._journal_rows()
        keep = {"ok", "unsupported"} if self.cfg.retry_errors else {"ok", "unsupported", "error"}
        finished = {sid for sid, r in done.items() if r.get("status") in keep}
        return [s.id for s in self.specs if s.id not in finished]

    def _manifest(self, backend: Backend | None, status: str, created_at: str) -> dict[str, Any]:
        if backend is not None:
            self._backend_info = backend.info()  # kept: a stop must not ask a server again
        return redact.mask_manifest({
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "label": self.label,
            "status": status,
            "created_at": created_at,
            "finished_at": rundir.utc_now() if status != RUNNING else None,
            "config_hash": self.config_hash,
            "attempt_id": self.attempt_id,
            "suite": self.cfg.suite.to_json(),
            "backend": self._backend_info,
            "model": self.cfg.model,
            "tokenizer": {"name": self.tokenizer.name, "fingerprint": self.tokenizer.fingerprint()},
            "chat_template": self.chat_template,
            "identity": self.identity,
            "model_fingerprint": self.model_fingerprint,
            "versions": versions(),
            "git_sha": git_sha(),
            "host": socket.gethostname(),
            "user": getpass.getuser(),
            "gpus": gpus(),
            "world": {"size": self.world.size, "replicas": self.world.n_replicas,
                      "ranks_per_replica": self.world.ranks_per_replica},
            "batch_size": self.batch_size,
            "command": self.cfg.command,
            "n_samples": len(self.specs),
        })

    def _check_existing(self) -> str | None:
        """Refuse to mix two configurations in one run dir, by the manifest or, without one, by the configuration
        hash every journal row carries; return the original creation time on resume."""
        old = rundir.read_manifest(self.run_dir)
        if old is None:
            other = journals.journal_config_hashes(self.run_dir) - {self.config_hash}
            if other:
                which = ", ".join(sorted(h or "none (rows older than the hash)" for h in other))
                raise UsageError(f"run dir {self.run_dir} has no manifest.json and its journals hold rows of another "
                                 f"configuration ({which}; this one is {self.config_hash}): pass --run-id NEW or "
                                 "move the journal folder away")
            return None
        self._old_manifest = old
        if old.get("config_hash") != self.config_hash:
            old_files = (old.get("model_fingerprint") or {}).get("files")
            new_files = (self.model_fingerprint or {}).get("files")
            changed = changed_files(old_files, new_files) if old_files and new_files else []
            what = f"the model's files changed: {', '.join(changed[:5])}; " if changed else ""
            raise UsageError(f"run dir {self.run_dir} holds a run with another configuration ({what}"
                             f"{old.get('config_hash')} != {self.config_hash}): pass --run-id NEW or remove it")
        return str(old.get("created_at") or rundir.utc_now())

    def _open_run_dir(self) -> tuple[lock.OwnerLock, tuple[str, str, list[str]]]:
        """World rank 0, before any work: take the run dir (see results.lock), clear what a kill left behind,
        check that it holds this configuration, reserve space and write the manifest (status running).

        Returns the lock and (attempt id, created_at, pending sample ids) for every rank. Bad state (a file where
        a folder belongs, the run dir in use, another configuration, an unreadable manifest or journal, a full or
        read-only disk) raises UsageError here, before any rank starts work."""
        out = Path(self.cfg.out_dir)
        for p, what in ((out, "--out"), (self.run_dir, "the run dir")):
            if p.exists() and not p.is_dir():
                raise UsageError(f"{what} {p} is a file, not a folder: move it away or pass another "
                                 f"{'--out' if p == out else '--run-id'}")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the run dir {self.run_dir}: {exc.strerror}; pass another --out") from None
        started = rundir.utc_now()
        owner = lock.acquire(self.run_dir, redact.mask_command(self.cfg.command), started)
        try:
            rundir.remove_stale_temporaries(self.run_dir)
            for note in journals.repair_journals(self.run_dir):
                print(f"evalctx: {note}", file=sys.stderr)
            created_at = self._check_existing() or started
            pending = self._pending_ids()
            self.attempt_id = owner.attempt_id
            rundir.reserve_space(self.run_dir)
            rundir.write_manifest(self.run_dir, self._manifest(None, RUNNING, created_at))
        except rundir.StorageError as exc:
            owner.release()
            raise UsageError(f"{exc}: free space (or fix the file system), or pass another --out") from None
        except BaseException:
            owner.release()
            raise
        return owner, (owner.attempt_id, created_at, pending)

    def _record_stop(self, exc: BaseException, created_at: str) -> bool:
        """Write why the run stopped into the manifest: interrupted for SIGINT/SIGTERM, failed otherwise; False
        when it could not be written. Every rank tries (rank 0 in full, the others by marking the manifest),
        since the first rank to abort the job kills the rest."""
        st = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else FAILED
        # The error text can quote a server URL with its password (mask_manifest ran before this field is added).
        reason = signal_name(exc) if st == INTERRUPTED else \
            redact.mask_text(" ".join(f"{type(exc).__name__}: {exc}".split()))[:300]
        disk_full = isinstance(exc, rundir.StorageError)
        if not self.world.is_root:
            return rundir.mark_stopped(self.run_dir, st, self.attempt_id, reason, disk_full)
        try:
            if self.world.distributed and rundir.stopped_by(self.run_dir, self.attempt_id):
                # Another rank recorded the first cause (a full disk there, then MPI_Abort's SIGTERM here).
                return True
            manifest = self._manifest(None, st, created_at)
            manifest["stopped_by"] = reason
            rundir.write_manifest(self.run_dir, manifest, disk_full)
            return True
        except RunFailed:
            return False  # the error being raised says more than a manifest we cannot write

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        """Evaluate every sample not yet in the journals and, on world rank 0, write results and summary.

        Raises UsageError for bad state found before any work (see ``_open_run_dir``); RunFailed when a write in
        the run dir fails mid-run (manifest status failed); KeyboardInterrupt on SIGINT or SIGTERM (status
        interrupted). In every case finished samples are kept and the same command resumes."""
        w = self.world
        owner, start, writers = None, None, None
        created_at = ""
        if w.is_root:
            owner, start = self._open_run_dir()
            created_at = start[1]
        try:
            # Rank 0 decides what is left and tells everyone: ranks that read the journals themselves, at slightly
            # different times, would see different leftovers and shard them differently (run twice or never).
            self.attempt_id, created_at, pending_ids = w.bcast_world(start)
            if w.is_leader:
                writers = lock.join_writers(self.run_dir, self.attempt_id)
            return self._run(created_at, set(pending_ids))
        except RefusedBeforeWork as exc:
            if self._old_manifest is None:  # a new run: its manifest says why it never started
                self._record_stop(exc, created_at)
            elif w.is_root:  # nothing of this command ran: the earlier run is left as it was
                rundir.write_manifest(self.run_dir, self._old_manifest)
            raise
        except BaseException as exc:
            marked = self._record_stop(exc, created_at)
            if isinstance(exc, rundir.StorageError):
                said = "the run is marked failed" if marked else "the manifest could not be updated"
                raise RunFailed(f"{exc}; {said} and finished samples are kept: free space (or fix the file "
                                "system) and rerun the same command to resume") from exc
            raise
        finally:
            if writers is not None:
                os.close(writers)
            if owner is not None:
                rundir.release_space(self.run_dir)
                owner.release()

    def _run(self, created_at: str, pending_ids: set[str]) -> RunOutcome:
        w = self.world
        pending = [s for s in self.specs if s.id in pending_ids]
        extra = {"label": self.label}
        ctx = BackendContext(
            model=self.cfg.model, tokenizer=self.tokenizer, world_rank=w.rank, world_size=w.size,
            replica=w.replica, rank_in_replica=w.rank_in_replica, replica_comm=w.replica_comm,
            max_input_len=max((self.builder.prompt_tokens(s) for s in self.specs), default=0),
            max_new_tokens=max((s.max_new_tokens for s in self.specs), default=0),
        )
        backend = self.cls(self.options, ctx)
        try:
            if w.is_root:
                self._check_identity(backend)
            extra.update(backend.row_columns())
            # the prompts' own counts: an upstream-shaped prompt's is not its level
            counted = self.builder.counted(pending)
            unsupported = {**self.builder.unbuildable(pending), **(backend.preflight(counted) if pending else {})}
            if w.is_root:
                rundir.write_manifest(self.run_dir, self._manifest(backend, RUNNING, created_at))
                if unsupported:
                    j = journals.Journal(self.run_dir, "preflight", self.config_hash)
                    j.append(unsupported_record(self.run_id, s, unsupported[s.id], extra)
                             for s in pending if s.id in unsupported)
                    j.close()
                    for reason in sorted(set(unsupported.values())):
                        print(f"evalctx: unsupported: {reason}", file=sys.stderr)
            # No rank journals before this manifest is written, so it never overwrites a stop (a full disk) that
            # another rank has recorded.
            w.bcast_world(None)
            runnable = [s for s in pending if s.id not in unsupported]
            if w.is_root and self.cfg.progress:
                # Named now, not only at the end: a long run's files can be watched (or found after a kill).
                print(f"evalctx: run {self.run_id} -> {self.run_dir}: {len(runnable)} of {len(self.specs)} "
                      f"samples to run", file=sys.stderr, flush=True)
            mine = shard(runnable, w.n_replicas)[w.replica]
            progress = Progress(len(runnable), sum(s.context_length for s in runnable),
                                enabled=self.cfg.progress and w.is_root)
            try:
                n_new = self._loop(backend, mine, extra, progress)
            finally:
                progress.close()  # also on a stop: ends the progress line before the stop's own line
        finally:
            backend.close()
        if not w.is_root:
            return RunOutcome(self.run_dir, len(self.specs), n_new, "complete")
        return self._finish(backend, created_at, n_new)

    def _loop(self, backend: Backend, mine: list[SampleSpec], extra: dict[str, Any], progress: Progress) -> int:
        w = self.world
        if not w.is_leader:
            while True:
                reqs = w.bcast_replica(None)
                if reqs is None:
                    return 0
                backend.generate(reqs)
        journal = journals.Journal(self.run_dir, f"replica-{w.replica}", self.config_hash)
        prompt_log = journals.Journal(self.run_dir, f"replica-{w.replica}", self.config_hash, prompts.PROMPTS_DIR) \
            if self.cfg.log_samples else None
        n_new = 0

        def record(rows: list[dict], tokens: int) -> None:
            nonlocal n_new
            journal.append(rows)
            n_new += len(rows)
            msg = (len(rows), tokens, sum(1 for r in rows if r["status"] == "error"))
            if w.is_root:
                progress.update(*msg)
                for m in w.poll_root(TAG_PROGRESS):
                    progress.update(*m)
            else:
                w.send_to_root(msg, TAG_PROGRESS)

        try:
            # Each window's prompts are built first and run in the order of their token ids, so that consecutive
            # prompts share the longest prefix (evalctx.run.prefix_order): KV caches that keep it (hf prefix_reuse,
            # servers' prefix caches) compute only what differs.
            for window in prefix_windows(mine):
                samples, unbuilt = self._build(window, extra)
                if unbuilt:
                    record(unbuilt, sum(r["context_length"] for r in unbuilt))
                for batch in batches(order_by_prefix(samples), self.batch_size):
                    rows = self._generate(backend, batch, extra)
                    if prompt_log is not None:  # before the journal: a journaled sample has its prompt logged
                        prompt_log.append(prompts.prompt_record(s, str(self.cfg.log_samples), self.tokenizer)
                                          for s in batch)
                    record(rows, sum(s.context_length for s in batch))
        finally:
            journal.close()
            if prompt_log is not None:
                prompt_log.close()
        w.bcast_replica(None)  # release this replica's followers
        if w.is_root:
            pending_leaders = w.n_replicas - 1
            while pending_leaders:
                for m in w.poll_root(TAG_PROGRESS):
                    progress.update(*m)
                if w.comm is not None and w.comm.iprobe(tag=TAG_DONE):
                    # World rank 0 reports the run's new samples: its own and every other leader's.
                    n_new += w.recv_root(TAG_DONE)[2]
                    pending_leaders -= 1
                else:
                    time.sleep(0.01)
            for m in w.poll_root(TAG_PROGRESS):
                progress.update(*m)
        else:
            w.send_to_root(("done", w.replica, n_new), TAG_DONE)
        return n_new

    def _build(self, specs: list[SampleSpec], extra: dict[str, Any]) -> tuple[list[Sample], list[dict]]:
        """The specs' samples, and an unsupported row for each spec no prompt of its exact length fits (a key
        longer than any :meth:`SampleBuilder.unbuildable` saw): that sample is skipped, the run goes on."""
        samples, rows = [], []
        for spec in specs:
            try:
                samples.append(self.builder.build(spec))
            except LengthError as exc:
                print(f"evalctx: unsupported: {exc}", file=sys.stderr)
                rows.append(unsupported_record(self.run_id, spec, str(exc), extra))
        return samples, rows

    def _generate(self, backend: Backend, samples: list[Sample], extra: dict[str, Any]) -> list[dict]:
        w = self.world
        reqs = [GenerationRequest(sample_id=s.id, prompt_ids=s.prompt_ids, prompt=s.prompt,
                                  max_new_tokens=s.max_new_tokens, add_special_tokens=s.add_special_tokens,
                                  prompt_mode=s.prompt_mode,
                                  extra={"messages": s.messages} if s.messages else {}) for s in samples]
        w.bcast_replica(reqs)
        results = backend.generate(reqs)
        if len(results) != len(reqs):
            raise RuntimeError(f"backend {backend.name} returned {len(results)} results for {len(reqs)}")
        for s, r in zip(samples, results):
            # len(prompt_ids): an upstream-shaped prompt's own count, which its context_length (the level) is not
            if r.error is None and r.n_prompt_tokens is not None and r.n_prompt_tokens != len(s.prompt_ids):
                raise LengthError(
                    f"backend {backend.name} saw {r.n_prompt_tokens} prompt tokens for a {len(s.prompt_ids)}"
                    f"-token prompt: its tokenizer differs from '{self.tokenizer.name}'; pass the model's "
                    "own tokenizer with --tokenizer")
        limits = backend.limits()
        return [make_record(self.run_id, s, r, w.replica, extra, limits) for s, r in zip(samples, results)]

    def _finish(self, backend: Backend, created_at: str, n_new: int) -> RunOutcome:
        status, summary = close_run(self.run_dir, self._journal_rows(), {s.id for s in self.specs}, self.label,
                                    self.cfg.max_error_rate,
                                    lambda status: self._manifest(backend, status, created_at))
        return RunOutcome(self.run_dir, len(self.specs), n_new, status, summary)

"""Suite files (TOML) and the resolved run configuration. Unknown keys are errors; flags override the file.

A suite file::

    name = "passkey"                 # optional; defaults to the file name
    description = "..."
    seed = 0                         # default for every task
    prompt_mode = "raw"              # raw | chat; default for every task
    model = "tiny"                   # optional defaults for `evalctx run`
    backend = "hf"
    batch_size = 1
    [backend_options]                # options of the backend, as --backend-opt key=value would give
    chunk_size = 4096

    [[tasks]]
    task = "passkey"
    name = "passkey"                 # optional: the entry's name in every row, table, plot and the gate;
                                     # entries of one name must be the same task, options and prompt_mode
    lengths = [1024, 4096]           # exact prompt lengths in tokens
    depths = [0.0, 0.5, 1.0]         # or { linear = 5 } or { sigmoid = 7 }
    samples = 5                      # per (length, depth) cell
    max_new_tokens = 6               # optional; the task's default otherwise
    [tasks.options]                  # the task's own options
    template = "trtllm"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalctx.errors import UsageError
from evalctx.capacity.limits import check_suite
from evalctx.results.rundir import check_name

SUITES_DIR = Path(__file__).parent / "suites"
PROMPT_MODES = ("raw", "chat")


@dataclass
class TaskSpec:
    task: str
    lengths: list[int]
    depths: list[float]
    samples: int = 1
    seed: int = 0
    max_new_tokens: int | None = None
    prompt_mode: str = "raw"
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    """The entry's name, the ``task`` column of every row, table, plot and the gate (default: ``task``, the task
    type)."""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.task


@dataclass
class Suite:
    name: str
    tasks: list[TaskSpec]
    description: str = ""
    path: str | None = None
    model: str | None = None
    backend: str | None = None
    batch_size: int = 1
    backend_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for t in d["tasks"]:
            if t["name"] == t["task"]:
                del t["name"]  # the default: keeps the configuration hash (and run id) of suites without names
        return d


_SUITE_KEYS = {"name", "description", "seed", "prompt_mode", "model", "backend", "batch_size", "backend_options",
               "tasks"}
_TASK_KEYS = {"task", "name", "lengths", "depths", "samples", "seed", "max_new_tokens", "prompt_mode", "options"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _where(path: str, key: str) -> str:
    return f"{path}: {key}"


def _int_list(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in value):
        raise UsageError(f"{where} must be a non-empty list of integers (token counts)")
    if any(v <= 0 for v in value):
        raise UsageError(f"{where} must hold positive token counts")
    return list(value)


def _task_spec(raw: Any, i: int, defaults: dict[str, Any], path: str) -> TaskSpec:
    from evalctx.tasks import TASKS, get_task
    from evalctx.tasks.depths import depth_grid

    where = f"{path}: tasks[{i}]"
    if not isinstance(raw, dict):
        raise UsageError(f"{where} must be a table ([[tasks]])")
    unknown = set(raw) - _TASK_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(_TASK_KEYS)}")
    if "task" not in raw:
        raise UsageError(f"{where}: missing 'task' (one of the names `evalctx tasks` lists)")
    get_task(raw["task"])  # unknown task name -> one line listing the known ones
    name = raw.get("name", raw["task"])
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{where}: name must be letters, digits, '_', '.' or '-' (starting with a letter or "
                         f"digit), not {name!r}")
    if name != raw["task"] and name in TASKS:
        raise UsageError(f"{where}: name {name!r} is another task's name; choose a name of its own")
    if "lengths" not in raw:
        raise UsageError(f"{where}: missing 'lengths' (prompt lengths in tokens)")
    samples = raw.get("samples", 1)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UsageError(f"{where}: samples must be a positive integer (samples per length x depth cell)")
    mnt = raw.get("max_new_tokens")
    if mnt is not None and (not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1):
        raise UsageError(f"{where}: max_new_tokens must be a positive integer")
    mode = raw.get("prompt_mode", defaults.get("prompt_mode", "raw"))
    if mode not in PROMPT_MODES:
        raise UsageError(f"{where}: prompt_mode must be one of {PROMPT_MODES}, not {mode!r}")
    seed = raw.get("seed", defaults.get("seed", 0))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"{where}: seed must be an integer")
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise UsageError(f"{where}: options must be a table ([tasks.options])")
    try:
        depths = depth_grid(raw.get("depths", [0.5]))
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return TaskSpec(
        task=raw["task"],
        lengths=_int_list(raw["lengths"], f"{where}: lengths"),
        depths=depths,
        samples=samples,
        seed=seed,
        max_new_tokens=mnt,
        prompt_mode=mode,
        options=dict(options),
        name=name,
    )


def _variant(ts: TaskSpec) -> tuple[str, str, str]:
    """What a row of one name must share: the task, its options with defaults filled in, and the prompt mode."""
    from evalctx.tasks import get_task

    options = {**getattr(get_task(ts.task), "defaults", {}), **ts.options}
    return ts.task, json.dumps(options, sort_keys=True, default=str), ts.prompt_mode


def check_entry_names(tasks: list[TaskSpec], path: str) -> None:
    """Entries of one name pool into one row everywhere, so they must be the same variant (raises UsageError)."""
    first: dict[str, int] = {}
    for i, ts in enumerate(tasks):
        j = first.setdefault(ts.name, i)
        if j != i and _variant(tasks[j]) != _variant(ts):
            raise UsageError(f"{path}: tasks[{j}] and tasks[{i}] are both named {ts.name!r} but differ in task, "
                             f"options or prompt_mode; give them distinct names (name = \"...\"): rows, tables, "
                             "plots and the gate key on it")


def resolve_suite_path(spec: str) -> Path:
    """A path to a .toml file, or the name of a suite in tasks/ (cwd) or shipped with the package."""
    p = Path(spec)
    if p.is_file():
        return p
    for folder in (Path("tasks"), SUITES_DIR):
        for cand in (folder / spec, folder / f"{spec}.toml"):
            if cand.is_file():
                return cand
    raise UsageError(f"suite not found: {spec!r} (give a .toml path or a name that `evalctx tasks` lists)")


def parse_suite(data: dict[str, Any], path: str, name: str) -> Suite:
    unknown = set(data) - _SUITE_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {sorted(unknown)}; known keys: {sorted(_SUITE_KEYS)}")
    tasks_raw = data.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise UsageError(f"{path}: needs at least one [[tasks]] table")
    if data.get("prompt_mode", "raw") not in PROMPT_MODES:
        raise UsageError(f"{path}: prompt_mode must be one of {PROMPT_MODES}")
    bs = data.get("batch_size", 1)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise UsageError(f"{path}: batch_size must be a positive integer")
    bopts = data.get("backend_options", {})
    if not isinstance(bopts, dict):
        raise UsageError(f"{path}: backend_options must be a table")
    tasks = [_task_spec(t, i, data, path) for i, t in enumerate(tasks_raw)]
    check_entry_names(tasks, path)
    suite = Suite(
        name=check_name(str(data.get("name", name)), f"{path}: name"),
        description=str(data.get("description", "")),
        tasks=tasks,
        path=path,
        model=data.get("model"),
        backend=data.get("backend"),
        batch_size=bs,
        backend_options=dict(bopts),
    )
    check_suite(suite)
    return suite


def load_suite(spec: str) -> Suite:
    path = resolve_suite_path(spec)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply to be a suite (arrays or tables within each other "
                         "hundreds of levels down)") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}): save the suite as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{path}: unreadable ({exc.strerror})") from None
    return parse_suite(data, str(path), path.stem)


def list_suites() -> list[tuple[str, str, str]]:
    """(name, description, path) of suites in ./tasks and in the package."""
    seen: dict[str, tuple[str, str, str]] = {}
    for folder in (SUITES_DIR, Path("tasks")):
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.toml")):
            try:
                desc = str(tomllib.loads(p.read_text(encoding="utf-8")).get("description", ""))
            except (tomllib.TOMLDecodeError, OSError):
                desc = "(unreadable)"
            seen[p.stem] = (p.stem, desc, str(p))
    return sorted(seen.values())


def config_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]

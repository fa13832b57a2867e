"""What differs between two runs besides the model, before ``compare`` and ``nightly-gate`` judge them cell by cell.

A regression or a pass is a statement about the system under test only when the measurement is the same. Two
kinds of difference:

* **settings of the measurement** (:data:`SETTINGS`): a suite entry that is another task or has other options
  (haystack content, template, key kinds), ``prompt_mode``, ``max_new_tokens``, the seeds, the scorer. A
  difference makes the comparison meaningless -- a budget of 3 tokens against 8 is a
  "regression" of the budget, not of the model -- so it is refused unless ``--allow-different NAME`` says it is
  meant;
* **the system under test** (:data:`SYSTEM`): model files, tokenizer, chat template (its frame and default system
  turn), backend and its options, what the server says it serves. Comparing two systems is what the gate is for,
  so these never refuse; they are listed with the verdict (stdout, JSON, report) so that no one reads a
  difference of models as a difference of the same model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import pandas as pd

from evalctx.errors import UsageError

SETTINGS = ("task", "prompt_mode", "max_new_tokens", "seed", "scorer")
"""Settings of the measurement: a difference is refused unless allowed (``--allow-different``)."""
SYSTEM = ("model", "tokenizer", "chat_template", "chat_date", "decoding", "backend", "server")
"""Listed, never refused: the system under test, and what comes with it -- its greedy rules (a generation config's
repetition penalty, a server preset's field names) and the day a date-writing chat template saw (runs of different
nights differ in it by design; pin it with --chat-date to compare identical prompts)."""


@dataclass(frozen=True)
class Difference:
    setting: str
    """One of :data:`SETTINGS` or :data:`SYSTEM`."""
    where: str
    """The suite entry it concerns, or "run"."""
    base: str
    cand: str

    @property
    def measurement(self) -> bool:
        return self.setting in SETTINGS

    def text(self) -> str:
        where = "" if self.where == "run" else f" of {self.where}"
        return f"{self.setting}{where}: {self.base} / {self.cand}"


def _per_entry(df: pd.DataFrame, column: str) -> dict[str, str]:
    """``{entry: "value"}`` of one column per suite entry (the ``task`` column), several values joined."""
    if column not in df.columns or df.empty:
        return {}
    out = {}
    for task, values in df.groupby("task")[column]:
        vals = sorted({str(v) for v in values.dropna()}, key=lambda v: (len(v), v))
        if vals:
            out[str(task)] = ", ".join(vals) if len(vals) <= 6 else f"{', '.join(vals[:6])}, ... ({len(vals)})"
    return out


def _variant(df: pd.DataFrame) -> dict[str, str]:
    """``{entry: "task_type {options}"}``; options as the run recorded them (defaults filled in)."""
    if not {"task_type", "task_options"} <= set(df.columns) or df.empty:
        return {}
    first = df[["task", "task_type", "task_options"]].dropna().drop_duplicates("task")
    return {str(r.task): f"{r.task_type} {r.task_options}" for r in first.itertuples(index=False)}


_IMPLIED = {"shape": "exact"}
"""Task options recorded only when set (so that older runs keep their ids), with the value their absence means."""


def _options_diff(a: str, b: str) -> tuple[str, str]:
    """Two ``"task_type {json}"`` strings cut to what differs (keys both record; an option added later keeps its
    old behaviour by default)."""
    ta, _, ja = a.partition(" ")
    tb, _, jb = b.partition(" ")
    if ta != tb:
        return ta, tb
    try:
        oa, ob = json.loads(ja), json.loads(jb)
    except ValueError:
        return a, b
    for key, default in _IMPLIED.items():  # recorded only when set: absent means the default
        if key in oa or key in ob:
            oa.setdefault(key, default)
            ob.setdefault(key, default)
    if "haystack_sha" in oa and "haystack_sha" in ob:  # the content decides, not the folder it was read from
        oa.pop("haystack_dir", None)
        ob.pop("haystack_dir", None)
    keys = sorted(k for k in set(oa) & set(ob) if oa[k] != ob[k])
    return (", ".join(f"{k}={oa[k]!r}" for k in keys), ", ".join(f"{k}={ob[k]!r}" for k in keys)) if keys else ("", "")


def _get(d: Mapping[str, Any] | None, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, Mapping):
            return None
        d = d.get(part)
    return d


def differences(base_manifest: Mapping[str, Any], base_df: pd.DataFrame, cand_manifest: Mapping[str, Any],
                cand_df: pd.DataFrame) -> list[Difference]:
    """Every difference of the two runs in what decides their scores, settings first. Fields a run does not
    record (a hand-made folder, a run older than the field) are not judged."""
    out: list[Difference] = []
    common = sorted(set(base_df["task"].astype(str)) & set(cand_df["task"].astype(str))) \
        if "task" in base_df and "task" in cand_df else []
    bv, cv = _variant(base_df), _variant(cand_df)
    for entry in common:
        if entry in bv and entry in cv and bv[entry] != cv[entry]:
            a, b = _options_diff(bv[entry], cv[entry])
            if a or b:
                out.append(Difference("task", entry, a, b))
    for setting, column in (("prompt_mode", "prompt_mode"), ("max_new_tokens", "max_new_tokens"),
                            ("scorer", "scorer")):
        b, c = _per_entry(base_df, column), _per_entry(cand_df, column)
        out += [Difference(setting, e, b[e], c[e]) for e in common if e in b and e in c and b[e] != c[e]]
    # Seeds as the suites give them (each sample's own seed is derived from its entry's).
    b, c = _seeds(base_manifest), _seeds(cand_manifest)
    out += [Difference("seed", e, b[e], c[e]) for e in common if e in b and e in c and b[e] != c[e]]
    out += _manifest_differences(base_manifest, cand_manifest)
    return out


def _seeds(manifest: Mapping[str, Any]) -> dict[str, str]:
    """``{entry: seed}`` from the manifest's suite (an entry's own seed, else the suite's)."""
    suite = manifest.get("suite") if isinstance(manifest.get("suite"), Mapping) else {}
    tasks = suite.get("tasks") if isinstance(suite.get("tasks"), list) else []
    out = {}
    for t in tasks:
        if isinstance(t, Mapping) and t.get("task"):
            seed = t.get("seed", suite.get("seed"))
            if seed is not None:
                out[str(t.get("name") or t["task"])] = str(seed)
    return out


# (setting, manifest path, shown as): run-level facts read from the manifests.
_MANIFEST_FIELDS = (
    ("chat_date", "chat_template.date"),
    ("decoding", "backend.decoding"),
    ("decoding", "backend.sampling"),
    ("model", "model_fingerprint.digest"),
    ("model", "backend.end_ids"),
    ("tokenizer", "tokenizer.fingerprint"),
    ("chat_template", "chat_template.sha1"),
    ("chat_template", "chat_template.default_system_turn"),
    ("backend", "backend.backend"),
)


def _manifest_differences(base: Mapping[str, Any], cand: Mapping[str, Any]) -> list[Difference]:
    out = []
    for setting, path in _MANIFEST_FIELDS:
        a, b = _get(base, path), _get(cand, path)
        if a is not None and b is not None and a != b:
            what = path.split(".")[-1]
            out.append(Difference(setting, "run", f"{what} {_short(a)}", f"{what} {_short(b)}"))
    ia, ib = _get(base, "identity"), _get(cand, "identity")
    if isinstance(ia, Mapping) and isinstance(ib, Mapping):
        for key in sorted(set(ia) & set(ib)):
            if ia[key] != ib[key]:
                out.append(Difference("server", "run", f"{key} {_short(ia[key])}", f"{key} {_short(ib[key])}"))
    oa, ob = _get(base, "backend.options"), _get(cand, "backend.options")
    if isinstance(oa, Mapping) and isinstance(ob, Mapping) and _get(base, "backend.backend") == \
            _get(cand, "backend.backend"):
        for key in sorted(set(oa) & set(ob)):
            if oa[key] != ob[key]:
                out.append(Difference("backend", "run", f"{key}={_short(oa[key])}", f"{key}={_short(ob[key])}"))
    return out


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


FINISHED = ("complete", "complete_with_errors")


def check_runs(base_dir: Any, cand_dir: Any, cand_manifest: Mapping[str, Any],
               base_manifest: Mapping[str, Any]) -> list[str]:
    """UsageError for a run a live command still holds (its numbers are still coming in); the reasons, for the
    verdict, why an unfinished run (killed, interrupted, failed) cannot pass."""
    from pathlib import Path

    from evalctx.results import lock

    for what, d in (("baseline", base_dir), ("candidate", cand_dir)):
        if lock.is_held(Path(d)):
            raise UsageError(f"the {what} {d} is still running (its run dir is locked): compare it once it has "
                             "finished; a verdict now would judge part of it")
    out = []
    for what, m in (("baseline", base_manifest), ("candidate", cand_manifest)):
        status = m.get("status")
        if status is not None and status not in FINISHED:
            out.append(f"the {what} run is {status!r}, not finished: not every sample ran")
    return out


def check(diffs: Iterable[Difference], allowed: Iterable[str]) -> list[Difference]:
    """The measurement differences ``allowed`` covers (to report); UsageError, one line naming every other one and
    the flag that accepts it, when any is left."""
    allowed = set(allowed)
    unknown = sorted(allowed - set(SETTINGS))
    if unknown:
        raise UsageError(f"--allow-different {' '.join(unknown)}: not a setting; choose from {', '.join(SETTINGS)} "
                         f"(differences of {', '.join(SYSTEM)} are listed, never refused)")
    measured = [d for d in diffs if d.measurement]
    refused = [d for d in measured if d.setting not in allowed]
    if refused:
        names = sorted({d.setting for d in refused}, key=SETTINGS.index)
        raise UsageError(f"the two runs measured differently ({'; '.join(d.text() for d in refused)}; baseline / "
                         f"candidate): a regression or a pass across them would be the settings', not the model's; "
                         f"rerun one with the other's settings, or pass --allow-different {' '.join(names)}")
    return measured


def as_dicts(diffs: Iterable[Difference]) -> list[dict[str, Any]]:
    return [{**asdict(d), "measurement": d.measurement} for d in diffs]


def lines(diffs: Iterable[Difference]) -> list[str]:
    """Markdown bullet lines: the settings compared across anyway, then the system under test."""
    diffs = list(diffs)
    out = [f"- compared across a different {d.text()}" for d in diffs if d.measurement]
    out += [f"- the system under test differs: {d.text()}" for d in diffs if not d.measurement]
    return out

"""Every shell command in README.md runs as written, in order, on a fresh copy of the repository.

Commands are the lines of the README's ```bash blocks. A command whose comment carries a tag that this machine
cannot satisfy ([GPU], [TensorRT-LLM], [your model], [server], [runs until Ctrl-C]) is skipped with that reason,
after its options are checked against evalctx's own parser; ``[exit N]`` is the exit status it must end with.

- The fast test (default): the copy runs with this Python's environment on PATH (a venv as `make demo` leaves it)
  and a fresh HOME; it skips what installs, runs the test suite, or evaluates a model through transformers
  (minutes), and the commands that read the results of those.
- The slow test (``-m slow``): everything untagged, in one shell, starting with `make demo` on a fresh venv, the
  way a new user types it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SKIP_TAGS = {
    "GPU": "needs a CUDA GPU",
    "TensorRT-LLM": "needs TensorRT-LLM",
    "your model": "needs a model directory of your own",
    "server": "needs a running OpenAI-compatible server",
    "runs until Ctrl-C": "a server: runs until stopped",
}
SETUP = ("make demo", "python3 -m venv", "pip install", ". .venv/bin/activate")
SLOW = {
    "make test": "the test suite itself",
    "python -m pytest": "the test suite itself",
    "python benchmarks/": "a benchmark (minutes)",
}
# run_eval.sh's own options and whether they take a value; the rest go to `evalctx run`.
RUN_EVAL_OPTS = {"-n": True, "--np": True, "--nightly": False, "--baseline": True, "--history": True,
                 "--out": True, "--gate-opt": True, "--mpirun": True}


@dataclass
class Command:
    text: str
    tags: list[str] = field(default_factory=list)
    exit_code: int = 0

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def _split_comment(line: str) -> tuple[str, str]:
    """(command, comment): the first ``#`` outside quotes that starts a word begins the comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def readme_commands(text: str) -> list[Command]:
    """The commands of every ```bash block, continuation lines joined, in README order."""
    out: list[Command] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        logical: list[str] = []
        for raw in block.splitlines():
            if logical and logical[-1].endswith("\\"):
                logical[-1] = logical[-1][:-1].rstrip() + " " + raw.strip()
            else:
                logical.append(raw.strip())
        for line in logical:
            cmd, comment = _split_comment(line)
            if not cmd:
                continue
            tags = re.findall(r"\[([^\]]+)\]", comment)
            unknown = [t for t in tags if t not in SKIP_TAGS and not re.fullmatch(r"exit \d+", t)]
            assert not unknown, f"README: unknown tag(s) {unknown} in: {line}"
            code = next((int(t.split()[1]) for t in tags if t.startswith("exit ")), 0)
            out.append(Command(cmd, [t for t in tags if t in SKIP_TAGS], code))
    return out


def _products(cmd: Command) -> list[str]:
    """The results/ path (or path prefix) an `evalctx run` or `run_eval.sh` command writes."""
    argv = cmd.argv
    if argv[:2] != ["evalctx", "run"] and not argv[0].endswith("run_eval.sh"):
        return []

    def opt(name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    if opt("--run-id"):
        return [f"results/{opt('--run-id')}"]
    suite = Path(opt("--suite") or "default").stem
    backend = opt("--backend")
    label = opt("--label") or Path(opt("--model") or ("tiny" if backend in (None, "hf") else backend)).name
    return [f"results/{suite}-{label}-"]


def fast_skip_reason(cmd: Command, skipped_products: list[str]) -> str | None:
    if cmd.tags:
        return "; ".join(SKIP_TAGS[t] for t in cmd.tags)
    if cmd.text.startswith(SETUP) or "&& pip install" in cmd.text:
        return "installs or builds the venv: the slow test runs it on a fresh venv"
    for prefix, why in SLOW.items():
        if cmd.text.startswith(prefix):
            return why
    argv = cmd.argv
    if argv[:2] == ["evalctx", "run"] and (argv[argv.index("--backend") + 1] if "--backend" in argv else "hf") \
            != "fake":
        return "evaluates a model through transformers on the CPU (minutes): the slow test runs it"
    if any(p in cmd.text for p in skipped_products):
        return "reads the results of a command skipped here: the slow test runs it"
    return None


def check_options(cmd: Command) -> None:
    """A skipped command's options must still exist: parse them with evalctx's parser (nothing runs)."""
    from evalctx.cli import build_parser

    argv = cmd.argv
    if argv[0].endswith("run_eval.sh"):
        rest, i = ["run"], 1
        while i < len(argv):
            takes = RUN_EVAL_OPTS.get(argv[i])
            if takes is None:
                rest.append(argv[i])
            i += 2 if takes else 1
        argv = ["evalctx", *rest]
    if argv[0] != "evalctx":
        return
    parser, _ = build_parser()
    try:
        parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"README command does not parse: {cmd.text}")


def fresh_copy(dest: Path) -> Path:
    """A fresh clone: the repository's files (tracked and new ones, nothing ignored) in a new git repository."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *args], cwd=dest, env=git_env, check=True, capture_output=True)
    return dest


def run_in_one_shell(cmds: list[Command], cwd: Path, env: dict[str, str], timeout: float) -> dict[int, tuple[int, str]]:
    """Run the commands in one bash, as typed into a terminal; per command: (exit status, its output)."""
    script = ["set -o pipefail"]
    for i, cmd in enumerate(cmds):
        script += [f"printf '\\n@@start {i}\\n'", cmd.text, f"printf '\\n@@end {i} %d\\n' $?"]
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    results = {}
    for m in re.finditer(r"@@start (\d+)\n(.*?)\n@@end \1 (\d+)", proc.stdout, flags=re.S):
        results[int(m.group(1))] = (int(m.group(3)), m.group(2))
    assert len(results) == len(cmds), f"the shell stopped early:\n{out[-3000:]}"
    return results


def _check(cmds: list[Command], results: dict[int, tuple[int, str]], stderr_hint: str = "") -> None:
    failed = [f"{c.text}\n  exit {results[i][0]}, README says {c.exit_code}:\n{results[i][1][-1500:]}"
              for i, c in enumerate(cmds) if results[i][0] != c.exit_code]
    assert not failed, "\n\n".join(failed) + stderr_hint


def test_readme_parses_into_commands() -> None:
    cmds = readme_commands(README.read_text())
    assert any(c.text == "evalctx run" for c in cmds)
    assert all("\\" not in c.text for c in cmds)  # continuations joined
    for c in cmds:
        if c.tags:
            check_options(c)


def test_readme_byte_tokenizer_minimum_is_the_one_run_refuses_with(tmp_path: Path, capsys) -> None:
    """The README's number for `--tokenizer byte` is the minimum `evalctx run` states when it refuses the default
    suite (issue 16's first example: exit 2, one line); it went stale once (352 written, 367 refused)."""
    from evalctx.cli import main

    said = re.search(r"`--tokenizer byte` needs lengths of at least (\d+) for (\w+)", README.read_text())
    assert said, "README: the sentence on --tokenizer byte's minimum length is gone"
    assert main(["run", "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"task {said.group(2)}:" in err and f"use lengths >= {said.group(1)}" in err, err


def test_readme_commands_fast(tmp_path: Path) -> None:
    repo = fresh_copy(tmp_path / "repo")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(repo),
           "HOME": str(tmp_path / "home"), "EVALCTX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("VIRTUAL_ENV", None)
    run: list[Command] = []
    skipped: list[tuple[str, str]] = []
    skipped_products: list[str] = []
    for cmd in readme_commands(README.read_text()):
        why = fast_skip_reason(cmd, skipped_products)
        if why is None:
            run.append(cmd)
            continue
        skipped.append((cmd.text, why))
        skipped_products += _products(cmd)
        check_options(cmd)
    assert len(run) >= 10, run
    results = run_in_one_shell(run, repo, env, timeout=600)
    _check(run, results, "\n\nskipped:\n" + "\n".join(f"  {t}: {w}" for t, w in skipped))


@pytest.mark.slow
def test_readme_commands_slow_on_a_fresh_venv(tmp_path: Path) -> None:
    repo = fresh_copy(tmp_path / "repo")
    # A new user's shell: no venv active, the system's python3 and make, nothing of this test run's environment.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not Path(p, "evalctx").exists() and ".venv" not in p)
    keep = ("PIP_", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "SSL_CERT", "REQUESTS_CA")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
    env.update({"PATH": path, "HOME": str(tmp_path / "home"), "EVALCTX_CACHE": str(tmp_path / "cache"),
                "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LANG": "C.UTF-8"})
    for conf in ("/etc/pip.conf", str(Path.home() / ".config" / "pip" / "pip.conf")):
        if Path(conf).is_file():  # the machine's package index settings, as the user's shell has them
            env.setdefault("PIP_CONFIG_FILE", conf)
    cmds = [c for c in readme_commands(README.read_text()) if not c.tags]
    results = run_in_one_shell(cmds, repo, env, timeout=3 * 3600)
    _check(cmds, results)


def _table_text(text: str) -> list[str]:
    """The run's printed tables without what depends on the machine: the median latency column (p50 s)."""
    out = []
    for line in text.strip().splitlines():
        if re.match(r"^\s*\d+ \|.*\]\s", line):  # a results row: drop its last field, the latency
            line = line.rsplit(None, 1)[0]
        out.append(line.rstrip())
    return out


def test_readme_default_run_table_is_the_runs_own_output(tmp_path: Path) -> None:
    """The README's "What the default run shows" block is what `evalctx run` (no arguments, the embedded tiny model)
    prints today, cell for cell, notes included (latencies differ by machine and are left out). About 2.5 minutes
    on a 2-core CPU: the README is the front door, and a table from an older build misleads every new user."""
    pytest.importorskip("torch")
    section = README.read_text().split("## What the default run shows", 1)[1]
    block = section.split("```\n", 2)[1]
    proc = subprocess.run([sys.executable, "-m", "evalctx.cli", "run", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout[:proc.stdout.index("\nrun ")]
    assert _table_text(block) == _table_text(printed)

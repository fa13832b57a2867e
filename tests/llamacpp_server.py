"""A real llama.cpp server for the ``llamacpp`` tests: llama-cpp-python[server] in its own venv (its pins never touch
the project's), the embedded tiny model converted to GGUF with llama.cpp's own converter, served on 127.0.0.1.

Settings (environment):

* ``EVALCTX_LLAMACPP_VENV``: the server's venv (default ``~/.cache/evalctx/llamacpp/venv``); built when its Python
  cannot import ``llama_cpp.server``: ``pip install 'llama-cpp-python[server]==0.3.36'`` compiles llama.cpp, 9 to
  21 minutes on 2 cores (pip caches the wheel; a second build takes seconds).
* ``EVALCTX_LLAMACPP_WHEELS``: a folder with an already built wheel (``pip --find-links``).
* ``EVALCTX_LLAMACPP_SDIST``: the package's sdist (.tar.gz), for its converter; default: ``pip download`` it.

Facts this relies on are in /work/shared/reference/real_server.md and docs/http.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

VERSION = "0.3.36"
CACHE = Path(os.environ.get("EVALCTX_CACHE", Path.home() / ".cache" / "evalctx")) / "llamacpp"
TINY = Path(__file__).resolve().parent.parent / "evalctx" / "data" / "models" / "tiny"
PRE_TOKENIZER = "refact"
"""llama.cpp's pre-tokenizer whose splitting matches the tiny tokenizer's (digits one by one, then byte-level
BPE): the converter knows tokenizers only by a hash of their output and has no flag to name one."""

# Runs llama.cpp's converter with one change: a tokenizer it does not know gets PRE_TOKENIZER instead of an error.
_CONVERT = """
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def named(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = named
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 3600) -> None:
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); see {log}:\n" + "\n".join(tail))


def server_python() -> Path:
    """The venv's Python with llama-cpp-python[server] and the converter's sentencepiece, built if missing."""
    venv = Path(os.environ.get("EVALCTX_LLAMACPP_VENV", CACHE / "venv"))
    python = venv / "bin" / "python"
    ok = python.exists() and subprocess.run([str(python), "-c", "import llama_cpp.server, sentencepiece"],
                                            capture_output=True).returncode == 0
    if ok:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "build.log"
    _run([sys.executable, "-m", "venv", str(venv)], log)
    wheels = os.environ.get("EVALCTX_LLAMACPP_WHEELS")
    env = dict(os.environ, CMAKE_ARGS="-DLLAVA_BUILD=OFF", CMAKE_BUILD_PARALLEL_LEVEL="2")
    _run([str(python), "-m", "pip", "install", "-q", *(["--find-links", wheels] if wheels else []),
          f"llama-cpp-python[server]=={VERSION}", "sentencepiece"], log, env)
    return python


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion package and gguf-py, from the package's sdist."""
    root = CACHE / f"convert-{VERSION}"
    script = root / "convert_hf_to_gguf.py"
    if script.exists():
        return root
    sdist = os.environ.get("EVALCTX_LLAMACPP_SDIST")
    if not sdist:
        dl = CACHE / "sdist"
        dl.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
              f"llama-cpp-python=={VERSION}"], CACHE / "build.log")
        sdist = str(next(dl.glob(f"llama_cpp_python-{VERSION}.tar.gz")))
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                   and (m.name == prefix + "convert_hf_to_gguf.py"
                        or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/")))]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(root, members=members, filter="data")
    return root


def tiny_gguf() -> Path:
    """The embedded tiny model in GGUF (f32, so that its logits stay those of the hf backend), cached by the
    model files' hash. The converter runs in this Python (it needs torch and transformers, as the hf backend does)
    with the server venv's sentencepiece."""
    h = hashlib.sha1()
    for p in sorted(TINY.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    out = CACHE / f"tiny-{h.hexdigest()[:12]}.f32.gguf"
    if out.exists():
        return out
    python = server_python()
    site = subprocess.run([str(python), "-c", "import sentencepiece, os; print(os.path.dirname(os.path.dirname("
                                             "sentencepiece.__file__)))"], capture_output=True, text=True,
                          check=True).stdout.strip()
    deps = CACHE / "convert-deps"
    deps.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(site):  # sentencepiece alone, not the venv's other packages
        if name.startswith("sentencepiece") and not (deps / name).exists():
            (deps / name).symlink_to(Path(site) / name)
    tmp = out.with_suffix(".tmp")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py, always
    env["PYTHONPATH"] = str(deps)
    _run([sys.executable, "-c", _CONVERT, str(converter()), PRE_TOKENIZER, str(TINY), "--outtype", "f32",
          "--outfile", str(tmp)], CACHE / "convert.log", env, timeout=600)
    tmp.replace(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(n_ctx: int, log: Path) -> Iterator[str]:
    """llama_cpp.server with the tiny model on 127.0.0.1; yields its /v1 URL; stops it (and only it) on exit.

    ``n_ctx`` must be a multiple of 256: llama.cpp rounds the context up to one, and llama-cpp-python 0.3.36 sizes
    an array by the number asked for, so a prompt between the two fails with HTTP 500 ("could not broadcast")."""
    python, model = server_python(), tiny_gguf()
    port = _free_port()
    with log.open("w") as fh:
        proc = subprocess.Popen([str(python), "-m", "llama_cpp.server", "--model", str(model), "--host",
                                 "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1"],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not start; see {log}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

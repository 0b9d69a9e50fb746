#!/usr/bin/env bash
# The full GPU check, run on a machine with a GPU (the lent H100 via the device tool, or yours):
#   bash scripts/gpu_check.sh [tests] [detect] [memory] [scheduler] [kernels] [prefill] [decode] [load] [quality]
#                             [serve] [kv] [kv128k] [train] [-- PYTEST_ARGS]
# No stage names = all but kv128k and train. Logs go to $OUT (default ./out): one file per stage, and a summary printed last.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NEXUSRT_CACHE_DIR=${NEXUSRT_CACHE_DIR:-/tmp/nexusrt-kernels}
stages=() pytest_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; pytest_args=("$@"); break; fi
  stages+=("$1"); shift
done
[ ${#stages[@]} -gt 0 ] || stages=(detect tests memory scheduler kernels prefill decode load quality serve kv)
# nvmath-python (cuBLASLt bindings) is not on the lent GPU machine: install wheels carried in .whl/.
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import nvmath" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary=()
run_stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-110)")")
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >"$OUT/card.txt" 2>&1
for s in "${stages[@]}"; do
  case $s in
    tests) run_stage tests python3 -m pytest -m gpu -q -rs -p no:cacheprovider --timeout=${PYTEST_TIMEOUT:-120} "${pytest_args[@]}" ;;
    detect|memory|scheduler|kernels) run_stage "$s" python3 -m nexusrt.bench.main --stage "$s" ;;
    prefill) run_stage prefill python3 -m nexusrt.bench.main --stage prefill --model synthetic:llama-3.2-1b
             run_stage prefill8b python3 -m nexusrt.bench.main --stage prefill --model synthetic:llama-3.1-8b ;;
    decode) run_stage decode python3 -m nexusrt.bench.main --stage decode --model synthetic:llama-3.2-1b
            run_stage decode8b python3 -m nexusrt.bench.main --stage decode --model synthetic:llama-3.1-8b
            # Issue 15's sampler target: a sampled token's cost over greedy, timed in pairs on one model.
            run_stage decode_sampled python3 -m nexusrt.bench.main --stage decode --model synthetic:llama-3.2-1b \
              --decode-paths graph --no-peers --temperature 0.7 --top-p 0.9 --versus-greedy ;;
    quality) run_stage quality python3 -m nexusrt.bench.main --stage quality --backend cuda ;;
    load) run_stage load python3 -m nexusrt.bench.main --stage load --model synthetic:llama-3.1-8b ;;
    serve) serve="python3 -m nexusrt.bench.main --stage serve --model synthetic:llama-3.1-8b --prompt-tokens 512 --new-tokens 256 --no-peers"
           run_stage serve $serve --concurrency 1,64 --runs 3
           # The same 64 requests with each prompt chunk alone through the prefill graphs (the ragged path's baseline).
           run_stage serve_perseq $serve --concurrency 64 --runs 3 --prefill-path per-sequence
           run_stage serve_det $serve --concurrency 1,64 --runs 1 --deterministic
           # Half the KV the 64 requests need at once: preemption by recompute, measured.
           run_stage serve_preempt $serve --concurrency 64 --runs 1 --kv-memory 3250000000
           # The same pool, the preempted requests swapped to a pinned host tier instead of recomputed.
           run_stage serve_swap $serve --concurrency 64 --runs 1 --kv-gpu-budget 3250000000 ;;
    kv) # The speed half only (the quality half is a CPU figure), at 8k and 32k.
        run_stage kv python3 -m nexusrt.bench.main --stage kv --backend cuda --model synthetic:llama-3.1-8b \
          --kv-part speed --kv-contexts 8192,32768 --runs 3 ;;
    kv128k) # 131,072 alone, one run, its rows in two commands (a stage of its own: the device tool's
        # calls end at 600 s, and 8k/32k plus 128k did not fit one); each host row fills a 128k runner.
        kv="python3 -m nexusrt.bench.main --stage kv --backend cuda --model synthetic:llama-3.1-8b --kv-part speed"
        run_stage kv128k_cde $kv --kv-contexts 131072 --runs 1 --kv-rows c,d,e
        run_stage kv128k_bf $kv --kv-contexts 131072 --runs 1 --kv-rows b,f ;;
    train) # The shipped model's training run (its manifest's flags) on this GPU; the data are the 3.11
           # stdlib files of scripts/stdlib_tiny_files.txt, carried in .data/stdlib311 (see that script).
           run_stage train python3 scripts/train_reference.py --out "$OUT/stdlib_tiny" --steps 800 --warmup 60 \
             --batch 16 --seq-len 512 --device cuda --stdlib "${STDLIB:-.data/stdlib311}" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
cat "$OUT/card.txt"
printf '%s\n' "${summary[@]}"

#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NEXUSRT_CACHE_DIR=/tmp/nexusrt-kernels
python3 -c "import nvmath" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PYTHONPATH:/tmp/site
o=$OUT
t() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" >"$o/$name.log" 2>&1; echo "$name rc=$? $((SECONDS-t0))s $(tail -n1 $o/$name.log | cut -c1-150)"; }
s="python3 -m nexusrt.bench.main --stage serve --model synthetic:llama-3.1-8b --prompt-tokens 512 --new-tokens 256 --no-peers"
t dec_graph 60 python3 -m nexusrt.bench.main --stage decode --model synthetic:llama-3.2-1b --no-peers
NEXUSRT_DECODE=persistent t dec_pers 60 python3 -m nexusrt.bench.main --stage decode --model synthetic:llama-3.2-1b --no-peers
t serve 150 $s --concurrency 1,64 --runs 3
t serve_perseq 100 $s --concurrency 64 --runs 1 --prefill-path per-sequence
t serve_temp 100 $s --concurrency 1,64 --runs 1 --temperature 0.8
t kvhost 120 python3 scripts/time_kv_host_tier.py --contexts 8192 32768

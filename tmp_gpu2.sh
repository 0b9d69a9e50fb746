#!/usr/bin/env bash
# temporary: second verification run of the integrate branch
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NEXUSRT_CACHE_DIR=/tmp/nexusrt-kernels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
o=$OUT
t() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" >"$o/$name.log" 2>&1; echo "$name rc=$? $((SECONDS-t0))s $(tail -n1 $o/$name.log | cut -c1-150)"; }
t fixed 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_sampling_rows.py tests/test_kv_host_tier.py
t dec_graph 70 python3 -m nexusrt.bench.main --stage decode --model synthetic:llama-3.2-1b
NEXUSRT_DECODE=persistent t dec_pers 70 python3 -m nexusrt.bench.main --stage decode --model synthetic:llama-3.2-1b
t mc_host 90 compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kv_host_tier.py -k "bit_identical and 4097"
t mc_rows 90 compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_sampling_rows.py -k "one_launch and 384"
t mc_batch 150 compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_batch.py -k "shipped and False-ragged or reference_rule and False"
t mc_pers 150 compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu -p no:cacheprovider "tests/test_persistent_gpu.py::test_teacher_forced_logits_equal_the_graph_path[llama]"
t rc_rows 90 compute-sanitizer --tool racecheck python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_sampling_rows.py -k "one_launch and 384"

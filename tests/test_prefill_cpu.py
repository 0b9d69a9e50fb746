"""Prefill on tensor cores, the parts that need no GPU: chunk planning over buckets, the GEMM
problem checks and the launcher's choice of lowering, the attention launcher's grid, the
FLOP count, the missing-package message, and the prefill benchmark stage on the CPU."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest

from nexusrt.backends.cuda.chunks import BUCKETS, buckets_for, plan_chunks
from nexusrt.kernels.ops import attention_prefill as pre
from nexusrt.kernels.ops import cublaslt
from nexusrt.kernels.ops.gemm import gemm
from nexusrt.kvcache.blocks import BLOCK_SIZE

from fakes import FakeKernel, FakeRuntime, tensor


# ------------------------------------------------------------------ chunk planning
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 100, 255, 256, 300, 1000, 1023, 1100, 2047, 3000, 4096, 5000, 8192, 9000])
@pytest.mark.parametrize("start", [0, 5, 1000])
def test_plan_covers_the_prompt_once_and_pads_only_the_last_chunk(n, start):
    capacity = start + n + 63
    chunks = plan_chunks(n, BUCKETS, start, capacity)
    assert sum(real for _, real in chunks) == n
    assert all(b in BUCKETS for b, _ in chunks)
    assert all(real == b for b, real in chunks[:-1])  # only the last one is padded
    b, real = chunks[-1]
    assert 1 <= real <= b
    assert b - real <= max(63, real // 8)  # padding stays small
    assert start + sum(r for _, r in chunks[:-1]) + b <= capacity  # padded rows fit the cache


def test_plan_examples():
    assert plan_chunks(16384, BUCKETS) == [(8192, 8192), (8192, 8192)]
    assert plan_chunks(3072, BUCKETS) == [(2048, 2048), (1024, 1024)]
    assert plan_chunks(4000, BUCKETS, 0, 4200) == [(4096, 4000)]  # 96 padded rows beat 9 more chunks
    assert plan_chunks(100, (64, 256)) == [(64, 64), (64, 36)]
    assert plan_chunks(1, BUCKETS) == [(64, 1)]


def test_plan_respects_the_cache_capacity_and_rejects_what_cannot_fit():
    chunks = plan_chunks(4000, BUCKETS, 0, 4063)  # 4096 rows would not fit: smaller chunks instead
    assert chunks[:2] == [(2048, 2048), (1024, 1024)] and sum(r for _, r in chunks) == 4000
    assert sum(r for _, r in chunks[:-1]) + chunks[-1][0] <= 4063
    with pytest.raises(ValueError, match="cache has 100"):
        plan_chunks(50, BUCKETS, 0, 100)
    with pytest.raises(ValueError, match="at least one token"):
        plan_chunks(0, BUCKETS)


def test_buckets_stop_at_the_first_that_holds_the_context():
    assert buckets_for(4096) == (64, 256, 1024, 2048, 4096)
    assert buckets_for(128) == (64, 256)
    assert buckets_for(40) == (64,)
    assert buckets_for(100000) == BUCKETS
    with pytest.raises(ValueError):
        buckets_for(0)


# ------------------------------------------------------------------ GEMM problems and the launcher
def test_problem_checks_name_the_bad_field():
    P = cublaslt.Problem
    assert P(4096, 6144, 4096).column_major() == {"a": (4096, 6144, 4096), "b": (4096, 4096, 4096),
                                                  "d": (6144, 4096, 6144)}
    assert P(2, 8, 8).flops == 2 * 2 * 8 * 8
    with pytest.raises(ValueError, match="multiples of 8"):
        P(4, 12, 16)
    with pytest.raises(ValueError, match="m must be a positive int"):
        P(0, 8, 8)
    with pytest.raises(ValueError, match="out must be fp32"):
        P(4, 8, 8, out="bf16", residual=True)
    with pytest.raises(ValueError, match="bias of the output's dtype"):
        P(4, 8, 8, out="bf16", bias="fp32")
    with pytest.raises(ValueError, match="output dtype"):
        P(4, 8, 8, out="fp16")


class _FakeLt:
    def __init__(self):
        self.plans = {}

    def plan(self, problem):
        return self.plans.setdefault(problem, SimpleNamespace(problem=problem))


def test_bf16_activations_choose_the_tensor_core_gemm():
    lt = _FakeLt()
    y, w, x = tensor((4096, 1024), "fp32"), tensor((1024, 512), "bf16", 0x2000), tensor((4096, 512), "bf16", 0x3000)
    g = gemm(None, y, w, x, m=4096, n=1024, k=512, residual=y, lt=lt)
    assert g.problem == cublaslt.Problem(4096, 1024, 512, out="fp32", bias=None, residual=True)
    assert g.ptrs == (0x1000, 0x2000, 0x3000, 0)
    assert "cublaslt[4096x1024x512" in g.name


@pytest.mark.parametrize("kwargs, message", [
    (dict(lt=None), "pass lt="),
    (dict(norm_weight=tensor((512,), "fp32"), rstd=tensor((8,), "fp32")), "no fused norm"),
    (dict(gate_up=True), "no fused norm or gate_up"),
    (dict(residual=tensor((8, 1024), "fp32", 0x9000)), "residual must be y itself"),
    (dict(bias=tensor((1024,), "bf16")), "bias of the output's dtype"),
])
def test_tensor_core_gemm_rejects_what_it_cannot_do(kwargs, message):
    args = dict(lt=_FakeLt())
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        gemm(None, tensor((8, 1024), "fp32"), tensor((1024, 512), "bf16"), tensor((8, 512), "bf16"), m=8, n=1024, k=512, **args)


def test_missing_nvmath_says_what_to_install(monkeypatch):
    from nexusrt.errors import BackendUnavailable

    monkeypatch.setitem(sys.modules, "nvmath", None)  # import nvmath... raises ImportError
    monkeypatch.setitem(sys.modules, "nvmath.bindings", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'nexusrt\[cuda\]'"):
        cublaslt.bindings()


def test_lt_context_refuses_the_cpu_backend(cpu_rt):
    from nexusrt.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="booted on CUDA"):
        cublaslt.LtContext(cpu_rt)


# ------------------------------------------------------------------ attention launcher
def test_bf16_output_picks_the_tensor_core_kernel_with_its_grid_and_shared_memory():
    kern = FakeKernel()
    rt = FakeRuntime(kern)
    asked = rt.asked
    m, hq, hkv, d = 300, 28, 4, 128
    spec = pre.attention_prefill(rt, tensor((m, hq, d), "fp32"), tensor((m, hq * d), "bf16"),
                                 tensor((5, hkv, BLOCK_SIZE, d), "bf16"), tensor((5, hkv, BLOCK_SIZE, d), "bf16"),
                                 tensor((5,), "int32"), tensor((1,), "int32"), num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    assert asked[0][:2] == ("attention_prefill_mma", "attention_prefill_mma_d128_w4_r2_qs")
    assert spec.grid == (hq, math.ceil(m / 128), 1) and spec.block == (128, 1, 1)  # MMA_SHAPE[128]
    assert spec.shared == pre.mma_shared_bytes(128) == (4 * 64 + 128) * 128 * 2
    assert pre.mma_shared_bytes(128, (8, 1, False)) == 4 * 64 * 128 * 2
    assert kern.shared == spec.shared  # > 48 KiB: opted in
    assert spec.args[-1] == pytest.approx(1.4426950408889634 / math.sqrt(128))
    with pytest.raises(ValueError, match=r"built for \(warps, tiles, q_in_smem\)"):
        pre.attention_prefill(rt, tensor((m, hq, d), "fp32"), tensor((m, hq * d), "bf16"),
                              tensor((5, hkv, BLOCK_SIZE, d), "bf16"), tensor((5, hkv, BLOCK_SIZE, d), "bf16"),
                              tensor((5,), "int32"), tensor((1,), "int32"), num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                              block=(4, 2))
    with pytest.raises(ValueError, match="out dtype fp16"):
        pre.attention_prefill(rt, tensor((m, hq, d), "fp32"), tensor((m, hq * d), "fp16"),
                              tensor((5, hkv, BLOCK_SIZE, d), "bf16"), tensor((5, hkv, BLOCK_SIZE, d), "bf16"),
                              tensor((5,), "int32"), tensor((1,), "int32"), num_q_heads=hq, num_kv_heads=hkv, head_dim=d)


def test_causal_flops_count_each_visible_key_once():
    assert pre.causal_flops(1, 0, 1, 1) == 4  # one row sees one key
    assert pre.causal_flops(3, 0, 2, 8) == 4 * 8 * 2 * 6  # 1 + 2 + 3 keys
    assert pre.causal_flops(2, 10, 1, 1) == 4 * (11 + 12)


# ------------------------------------------------------------------ the benchmark stage
def test_prefill_flops_match_a_hand_count():
    from nexusrt.bench.prefill import prefill_flops
    from nexusrt.models.presets import preset

    cfg = preset("llama-3.2-1b")
    f = prefill_flops(cfg, 2048)
    per_row = 2 * (3072 * 2048 + 2048 * 2048 + 3 * 8192 * 2048) * 16
    assert f["linear"] == per_row * 2048
    assert f["attention"] == 16 * 4 * 64 * 32 * 2048 * 2049 // 2
    assert 5.2e-3 < f["total"] / 790e12 < 5.6e-3  # the "≈5.4 ms at 790 TFLOP/s"


def test_prefill_stage_runs_on_the_cpu_and_says_what_it_ran(capsys):
    from nexusrt.bench.main import main

    assert main(["--stage", "prefill", "--backend", "cpu", "--prompt-tokens", "9,20", "--runs", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "nexusrt:stdlib-tiny" and "instead of" in r["notes"][0]
    assert [x["prompt_tokens"] for x in r["lengths"]] == [9, 20]
    assert all(x["ttft_ms"] > 0 and x["flops"] > 0 for x in r["lengths"])


@pytest.mark.parametrize("value, message", [("12,x", "comma-separated"), ("0", ">= 1"), ("", "comma-separated")])
def test_prefill_stage_rejects_bad_lengths(value, message, capsys):
    from nexusrt.bench.main import main

    assert main(["--stage", "prefill", "--backend", "cpu", "--prompt-tokens", value]) == 1
    assert message in capsys.readouterr().err


def test_decode_stage_takes_one_prompt_length(capsys):
    from nexusrt.bench.main import main

    assert main(["--stage", "decode", "--backend", "cpu", "--prompt-tokens", "8,16"]) == 1
    assert "one --prompt-tokens value" in capsys.readouterr().err

"""The GEMV-family, elementwise and kv_compact kernel sources compile with NVRTC for sm_80 and sm_90a (no GPU)."""

from __future__ import annotations

import re

import pytest

from nexusrt.kernels.compiler import SOURCE_DIR, compile_file

SOURCES = {
    "gemv": [f"gemv_m{m}_{kind}_v{v}" for m in (1, 2, 4, 8) for kind in ("rows", "gateup") for v in (8, 1)],
    "gemm": ["gemm_rows", "gemm_gateup", "gemm_row_rstd"],
    "elementwise": ["embedding", "rms_norm_bf16", "silu_mul_bf16", "f32_to_bf16", "bf16_to_f32",
                    "fill_uniform_bf16"],
    "membw": ["membw_read"],
    "kv_compact": [f"kv_compact_d{d}" for d in (64, 128, 256)],
}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_compiles_with_every_kernel(source, arch):
    result = compile_file(source, arch, use_cache=False)
    assert result.cubin[:4] == b"\x7fELF"
    for name in SOURCES[source]:
        assert name.encode() in result.cubin, f"{name} missing from {source}.cu for {arch}"


def test_kv_block_size_matches_the_header():
    from nexusrt.kvcache.blocks import BLOCK_SIZE

    header = (SOURCE_DIR / "common.cuh").read_text()
    assert int(re.search(r"#define NRT_PAGE_SIZE (\d+)", header).group(1)) == BLOCK_SIZE


def test_epilogue_flags_match_the_kernels():
    from nexusrt.kernels.ops import common

    for source in ("gemv_body.cuh", "gemm.cu"):
        text = (SOURCE_DIR / source).read_text()
        for name, value in (("kBias", common.FLAG_BIAS), ("kBiasBf16", common.FLAG_BIAS_BF16),
                            ("kResidual", common.FLAG_RESIDUAL), ("kNorm", common.FLAG_NORM)):
            assert re.search(rf"\b{name} = {value}\b", text), f"{name} != {value} in {source}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_ring_gemv_exists_from_sm90_on(arch):
    """gemv_ring.cu's entry points need the bulk-copy engine: on sm_80 the module compiles empty."""
    cubin = compile_file("gemv_ring", arch, use_cache=False).cubin
    for name in ("gemv_ring_rows", "gemv_ring_gateup"):
        assert (name.encode() in cubin) == (arch == "sm_90a"), (name, arch)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_gemv_has_the_slim_one_token_entries(arch):
    cubin = compile_file("gemv", arch, use_cache=False).cubin
    for name in ("gemv_m1_rows_v8_slim", "gemv_m1_gateup_v8_slim"):
        assert name.encode() in cubin, (name, arch)


def test_check_fills_the_cache_only_when_asked(tmp_path, monkeypatch, capsys):
    """`python -m nexusrt.kernels.check --cache sm_90a` leaves cubins a GPU machine can load
    (NEXUSRT_CACHE_DIR carried to it) instead of compiling on its first run."""
    from nexusrt.kernels import check

    monkeypatch.setattr(check, "all_sources", lambda: ["membw"])
    monkeypatch.setenv("NEXUSRT_CACHE_DIR", str(tmp_path))
    assert check.main(["sm_90a"]) == 0 and list(tmp_path.iterdir()) == []
    assert check.main(["--cache", "sm_90a"]) == 0
    cubins = list(tmp_path.glob("membw-sm_90a-*.cubin"))
    assert len(cubins) == 1 and cubins[0].read_bytes()[:4] == b"\x7fELF"
    capsys.readouterr()
    assert check.main(["--cache", "sm_90a"]) == 0 and "(cached)" in capsys.readouterr().out
    assert check.main(["--cahce"]) == 2 and "not an arch: --cahce" in capsys.readouterr().err

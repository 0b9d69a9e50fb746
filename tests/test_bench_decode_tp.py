"""``nexusrt-bench --stage decode --tensor-parallel N`` on the CPU: the flag and its refusals
(before any work), a TP=2 run in process and through worker processes whose printed figures
agree with each other, per-rank bytes, issue 17's targets, and the table when TP=1 cannot run."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
from types import SimpleNamespace

import pytest

from nexusrt.bench import decode_tp
from nexusrt.bench.decode import render
from nexusrt.bench.decode_timing import bytes_per_token
from nexusrt.bench.main import build_parser, main
from nexusrt.errors import BackendUnavailable
from nexusrt.models.presets import preset

SHORT = ["--stage", "decode", "--backend", "cpu", "--new-tokens", "4", "--prompt-tokens", "5", "--runs", "2"]


def test_flag_parses_with_its_help():
    parser = build_parser()
    assert parser.parse_args(["--stage", "decode", "--tensor-parallel", "4"]).tensor_parallel == 4
    args = parser.parse_args(["--stage", "decode"])
    assert args.tensor_parallel is None and args.tp_processes is False
    assert "--tensor-parallel N" in parser.format_help() and "all-reduce time per token" in parser.format_help()


def test_a_non_integer_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--stage", "decode", "--tensor-parallel", "two"])
    err = capsys.readouterr().err  # one line and status 1, as every error (not argparse's usage block and 2)
    assert exit_.value.code == 1 and err == ("nexusrt-bench: error: argument --tensor-parallel: invalid int value: "
                                             "'two' (see nexusrt-bench --help)\n")


@pytest.mark.parametrize("argv, message", [
    (["--tensor-parallel", "0"], "--tensor-parallel must be an integer >= 1, got 0"),
    (["--tensor-parallel", "-2"], "--tensor-parallel must be an integer >= 1, got -2"),
    (["--tensor-parallel", "4"], r"num_key_value_heads \(2\) is not divisible by tensor_parallel=4"),
    (["--tensor-parallel", "2", "--decode-paths", "graph,persistent"],
     "--decode-paths persistent with --tensor-parallel 2: a tensor-parallel rank keeps the graph path"),
    (["--tensor-parallel", "2", "--persistent-profile"], "--persistent-profile profiles the one-GPU persistent"),
    (["--tp-processes"], "give --tensor-parallel N too"),
])
def test_refusals_come_before_any_work(argv, message, capsys, no_work):
    assert main(SHORT + argv) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_the_persistent_path_in_the_environment_is_refused(capsys, no_work, monkeypatch):
    monkeypatch.setenv("NEXUSRT_DECODE", "persistent")
    assert main(SHORT + ["--tensor-parallel", "2"]) == 1
    assert "NEXUSRT_DECODE=persistent with --tensor-parallel 2" in capsys.readouterr().err


@pytest.mark.parametrize("stage, flag", [("prefill", ["--tensor-parallel", "2"]), ("kernels", ["--tp-processes"]),
                                         ("serve", ["--tensor-parallel", "1"])])
def test_other_stages_refuse_the_flags(stage, flag, capsys, monkeypatch):
    from nexusrt.bench import main as main_mod

    monkeypatch.setattr(main_mod, "_stage_module", _guarded_modules(main_mod._stage_module, stage))
    assert main(["--stage", stage, "--backend", "cpu", *flag]) == 1
    err = capsys.readouterr().err
    assert f"{flag[0]} applies to the decode stage only (--stage decode); --stage {stage} does not take it" in err


def _guarded_modules(real, stage):
    """_stage_module with the asked stage's ``run`` replaced by a failure (the refusal comes first)."""
    def get(name):
        module = real(name)
        if name != stage:
            return module

        def run(_args):
            raise AssertionError(f"the {stage} stage ran")

        return SimpleNamespace(**{k: getattr(module, k) for k in dir(module)
                                  if not k.startswith("__") and k != "run"}, run=run)

    return get


def test_more_ranks_than_gpus_are_refused_as_the_cuda_front_refuses(monkeypatch):
    from nexusrt.backends.cuda import tp_front

    monkeypatch.setattr(tp_front, "gpu_count", lambda: 1)
    with pytest.raises(BackendUnavailable, match="tensor_parallel=2 needs 2 GPUs .*shows 1"):
        decode_tp.check_degree(SimpleNamespace(is_cuda=True), preset("llama-3.1-8b"), 2)
    monkeypatch.setattr(tp_front, "gpu_count", lambda: 8)
    decode_tp.check_degree(SimpleNamespace(is_cuda=True), preset("llama-3.1-70b"), 8)  # 1 KV head a rank: fine


def _run_json(capsys, *extra) -> dict:
    assert main(SHORT + ["--tensor-parallel", "2", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _line(text: str, label: str) -> str:
    """The value column of the table row ``label`` (columns' padding aside)."""
    for line in text.splitlines():
        if line.lstrip().startswith(label + "  "):
            return line.lstrip()[len(label):].strip()
    raise AssertionError(f"no row {label!r} in:\n{text}")


def _check_consistent(r: dict) -> None:
    """What the JSON and the printed table say agree with each other and with their definitions."""
    n, tp1, c = r["tensor_parallel"], r["tp1"], r["collectives"]
    assert n == 2 and len(r["ms_per_token_runs"]) == 2 and len(tp1["ms_per_token_runs"]) == 2
    assert r["tp_ratio"] == r["ms_per_token"] / tp1["ms_per_token"]
    assert r["floor_ms"] == r["bytes_per_rank"]["total"] / r["read_bandwidth_bytes_s"] * 1e3
    assert r["fraction_of_floor"] == r["floor_ms"] / r["ms_per_token"]
    assert tp1["floor_ms"] == r["bytes_per_token"]["total"] / r["read_bandwidth_bytes_s"] * 1e3
    assert r["bytes_per_rank"]["total"] < r["bytes_per_token"]["total"] and r["elem_bytes"] == 4
    layers = 4  # stdlib-tiny
    assert c["all_reduces"] == 2 * layers and c["steps"] == decode_tp.COLLECTIVE_STEPS
    assert c["per_token_s"] == max(c["per_rank_s"]) > 0
    text = render(r)
    ms_n = float(_line(text, "ms / token (TP=2)").split()[0])
    ms_1 = float(_line(text, "ms / token (TP=1)").split()[0])
    ratio = float(_line(text, "TP=2 / TP=1").rstrip("x"))
    assert abs(ratio - ms_n / ms_1) < 6e-4  # the printed times' ratio, to the printed ratio's 3 decimals
    assert _line(text, "floor (TP=2)").startswith(f"{r['floor_ms']:.4f} ms/token (one rank's bytes); "
                                                  f"{r['fraction_of_floor']:.1%} of it reached")
    assert _line(text, "all-reduce / token").startswith(f"{c['per_token_s'] * 1e3:.4f} ms")
    assert f"{2 * layers} all-reduces of one hidden row" in _line(text, "what it measures")
    assert _line(text, "target").startswith("none for this shape at TP=2")
    assert "{" not in text


def test_cpu_run_in_process_prints_both_rows_ratio_floor_and_all_reduce(capsys):
    r = _run_json(capsys)
    _check_consistent(r)
    c = r["collectives"]
    assert c["ranks"] == [None] and c["all_gathers"] == 1 and "in this process" in r["tp_how"]
    assert "CPU floor" in r["note"]


def test_cpu_run_through_worker_processes_times_every_rank(capsys):
    r = _run_json(capsys, "--tp-processes")
    _check_consistent(r)
    c = r["collectives"]
    assert c["ranks"] == [0, 1] and c["all_gathers"] == 0 and "worker process each" in r["tp_how"]
    assert "gather" not in _line(render(r), "what it measures")
    assert not multiprocessing.active_children()


def test_degree_one_is_the_plain_stage(capsys):
    assert main(SHORT + ["--tensor-parallel", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "tp1" not in r and "tensor_parallel" not in r and "floor_ms" not in r


def test_bytes_per_rank_are_the_split_weights_plus_the_replicated_ones():
    cfg = preset("llama-3.1-8b")
    one, two = bytes_per_token(cfg, 1000), bytes_per_token(cfg, 1000, tensor_parallel=2)
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    replicated = L * 2 * h * 4 + h * 4 + h * 2  # norms (fp32) and the embedding row read
    assert two["weights"] == (one["weights"] - replicated) // 2 + replicated
    assert two["kv"] == one["kv"] // 2 == 32 * 4 * 128 * 2 * 2 * 1000  # 4 of 8 KV heads a rank
    seventy = bytes_per_token(preset("llama-3.1-70b"), 96, tensor_parallel=4)
    # 141 GB of bf16 less the embedding table (one row of it is read) over four H200s
    assert abs(seventy["weights"] / 1e9 - 34.76) < 0.01
    assert bytes_per_token(cfg, 10, elem=4)["weights"] > 1.9 * one["weights"]  # the CPU's fp32


@pytest.mark.parametrize("name, n, ratio, fraction, text, met", [
    ("llama-3.1-8b", 2, 0.55, 0.5, "TP=2 <= 0.60x TP=1 at the Llama-3.1-8b shape (issue 17): met (0.550x)", True),
    ("llama-3.1-8b", 2, 0.72, 0.5, "not met (0.720x)", False),
    ("llama-3.1-8b", 2, None, 0.5, "not judged, TP=1 did not run", None),
    ("llama-3.1-70b", 4, None, 0.85, ">= 80% of the TP=4 floor at the Llama-3.1-70b shape (issue 17): met (85.0%)",
     True),
    ("llama-3.1-70b", 4, None, 0.79, "not met (79.0%)", False),
    ("llama-3.1-70b", 8, None, 0.5, "TP=8 at the Llama-3.1-70b shape: reported, no target", None),
    ("llama-3.1-8b", 4, 0.4, 0.5, "none for this shape at TP=4", None),
    ("llama-3.2-1b", 2, 0.4, 0.5, "none for this shape at TP=2", None),
])
def test_issue_17_targets_apply_to_their_shape_and_degree(name, n, ratio, fraction, text, met):
    cfg = dataclasses.replace(preset(name), source="a checkpoint's config.json")  # a shape, whatever its source
    got = decode_tp.target(cfg, n, ratio, fraction)
    assert text in got["text"] and got["met"] is met


def test_a_tp1_that_does_not_fit_is_said_and_the_rest_still_printed():
    r = {"model": "synthetic:llama-3.1-70b", "device": "NVIDIA H200", "backend": "cuda", "profile": "h200",
         "prompt_tokens": 32, "new_tokens": 128, "runs": 5, "sampling": None, "tensor_parallel": 4,
         "tp_how": "4 ranks: one worker process per GPU, NCCL", "ms_per_token": 10.0, "ms_per_token_runs": [10.0],
         "ttft_s": 0.2, "tokens_per_s": 100.0, "elem_bytes": 2, "bytes_per_token": {"total": 141e9},
         "bytes_per_rank": {"total": 35.3e9}, "achieved_bytes_s": 3.53e12, "read_bandwidth_bytes_s": 4.4e12,
         "read_bandwidth_how": "membw probe on device 0, rank 0's GPU", "floor_ms": 8.02, "fraction_of_floor": 0.802,
         "tp1": {"skipped": "synthetic:llama-3.1-70b does not fit: it needs 132 GiB"},
         "target": {"text": ">= 80% of the TP=4 floor at the Llama-3.1-70b shape (issue 17): met (80.2%)", "met": True},
         "collectives": {"per_token_s": 1.6e-3, "per_rank_s": [1.5e-3, 1.6e-3, 1.55e-3, 1.58e-3], "ranks": [0, 1, 2, 3],
                         "all_reduces": 160, "all_gathers": 1, "steps": 20, "share_of_token": 0.16,
                         "clock": "CUDA events around a replayed graph of them on the rank's stream"}}
    text = render(r)
    assert _line(text, "ms / token (TP=1)") == "not run: synthetic:llama-3.1-70b does not fit: it needs 132 GiB"
    assert _line(text, "TP=4 / TP=1") == "-" and "floor (TP=1)" not in text
    assert _line(text, "all-reduce / token") == "1.6000 ms (16.0% of the TP=4 token)"
    assert ("160 all-reduces of one hidden row + 1 all-gather of the logits per token, timed alone (CUDA events "
            "around a replayed graph of them on the rank's stream); each rank's median of 20 steps, the slowest of "
            "4 timing(s)") == _line(text, "what it measures")


def test_a_tp1_that_does_not_fit_leaves_the_tp_figures(capsys, monkeypatch):
    from nexusrt.errors import ModelTooLarge

    real = decode_tp.time_generation

    def one_device_too_small(model, prompt, args, label, **kw):
        if label == "TP=1":  # as check_fit refuses 70B on one H200, before a byte is read
            raise ModelTooLarge(f"{model} does not fit: it needs 132 GiB", 132 << 30, 131 << 30)
        return real(model, prompt, args, label, **kw)

    monkeypatch.setattr(decode_tp, "time_generation", one_device_too_small)
    r = _run_json(capsys)
    assert r["tp1"] == {"skipped": "nexusrt:stdlib-tiny does not fit: it needs 132 GiB"} and "tp_ratio" not in r
    assert r["ms_per_token"] > 0 and r["floor_ms"] > 0 and r["collectives"]["per_token_s"] > 0
    assert _line(render(r), "TP=2 / TP=1") == "-"


def test_a_runner_without_ranks_has_no_collective_timer():
    with pytest.raises(RuntimeError, match="not a tensor-parallel runner"):
        decode_tp.collective_timer(SimpleNamespace(decoder=object()))

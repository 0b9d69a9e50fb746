"""``nexusrt-bench`` refuses bad arguments in one line with status 1, naming the flag and the
allowed range, instead of argparse's usage block and status 2, or a silent clamp."""

from __future__ import annotations

import json

import pytest

from bench_helpers import one_line_error

from nexusrt.bench.main import main


@pytest.mark.parametrize("argv, pattern", [
    (["--stage", "nope"], r"argument --stage: invalid choice: 'nope' .*\(see nexusrt-bench --help\)$"),
    (["--stage", "memory", "--mem-size-mib", "x"], r"argument --mem-size-mib: invalid int value: 'x'"),
    (["--nope"], r"unrecognized arguments: --nope"),
])
def test_usage_errors_are_one_line_and_exit_1(capsys, argv, pattern):
    one_line_error(capsys, argv, pattern)


def test_help_still_prints_usage_and_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nexusrt-bench") and "--mem-size-mib" in out


@pytest.mark.parametrize("flag, value, allowed", [
    ("--mem-size-mib", "-1", ">= 1"), ("--mem-size-mib", "0", ">= 1"), ("--mem-reps", "0", ">= 1"),
    ("--mem-pages", "-3", ">= 1"), ("--mem-alloc-reps", "-1", ">= 1"),
    ("--scheduler-launches", "-5", ">= 1"), ("--scheduler-repeats", "0", ">= 1"),
    ("--window", "0", ">= 2"), ("--window", "1", ">= 2"),
    ("--kv-memory", "-5", ">= 0"), ("--kv-gpu-budget", "-1", ">= 0"),
])
def test_out_of_range_numbers_are_refused_not_clamped(capsys, flag, value, allowed):
    stage = {"mem": "memory", "sch": "scheduler", "win": "quality", "kv-": "serve"}[flag[2:5]]
    one_line_error(capsys, ["--stage", stage, "--backend", "cpu", flag, value],
                    rf"argument {flag}: must be {allowed}, got {value} \(see nexusrt-bench --help\)$")


@pytest.mark.parametrize("value", ["0", "1", "40000"])
def test_a_kv_memory_without_room_for_one_block_names_the_flag(capsys, value):
    # nexusrt:stdlib-tiny on the CPU: 4 layers x K,V x 2 KV heads x 16 tokens x 64 x fp32 = 65536 bytes a block
    one_line_error(capsys, ["--stage", "serve", "--backend", "cpu", "--no-peers", "--runs", "1",
                             "--prompt-tokens", "8", "--new-tokens", "2", "--concurrency", "1", "--kv-memory", value],
                    rf"--kv-memory {value} bytes holds no KV block \(65536 bytes\) of this model")


def test_a_window_longer_than_the_context_is_cut_and_said(capsys):
    assert main(["--stage", "quality", "--backend", "cpu", "--tokens", "40", "--window", "100000", "--no-hf",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["window"] == 2048
    assert ("--window 100000 is longer than nexusrt:stdlib-tiny's context of 2048 tokens: scoring windows of 2048"
            in err)


def test_ctrl_c_while_the_stages_are_imported_is_one_line(monkeypatch, capsys):
    from nexusrt.bench import main as bench_main

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_main, "build_parser", interrupted)
    try:
        status = bench_main.main(["--stage", "detect"])
    except KeyboardInterrupt:  # not let through: it would stop the whole test session
        pytest.fail("the KeyboardInterrupt escaped nexusrt-bench's main")
    assert status == 130
    assert capsys.readouterr().err == "nexusrt-bench: interrupted\n"

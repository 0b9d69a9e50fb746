"""``nexusrt-bench`` refuses what it cannot run before any long work, in one line naming the
flag: options of other stages (each stage declares the options it reads, checked against its
code), options its backend ignores, runs past the model's context, a per-token time of one
token, a plot it could not write, pruning budgets the sinks fill, KV pools past the memory."""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest

from bench_helpers import one_line_error

import nexusrt as nrt
from nexusrt.bench import common, decode, kv, serve
from nexusrt.bench.main import COMMON, STAGES, _stage_module, build_parser, main, refuse_other_stages_options

BENCH = Path(decode.__file__).parent


@pytest.fixture(autouse=True)
def _shutdown():
    nrt.firmware.shutdown()
    yield
    nrt.firmware.shutdown()


# -- which stage takes which option ---------------------------------------------------------------
def _dests() -> set[str]:
    return {a.dest for a in build_parser()._actions if a.option_strings}


def _args_read(tree) -> set[str]:
    """The names a module reads off ``args``: ``args.x`` and ``getattr(args, "x", ...)``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            out.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "args"
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            out.add(node.args[1].value)
    return out


def _handed_args(tree) -> set[str]:
    """The nexusrt.bench modules a module hands ``args`` to: a call with ``args`` among its
    arguments, of a function imported from one (``from .x import f``: ``f(args)``; ``from . import
    x``: ``x.f(args)``)."""
    functions, modules = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                functions.update({a.asname or a.name: node.module.split(".")[0] for a in node.names})
            else:
                modules.update(a.asname or a.name for a in node.names)
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        values = list(node.args) + [k.value for k in node.keywords]
        if not any(isinstance(v, ast.Name) and v.id == "args" for v in values):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
            out.add(functions[f.id])
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules:
            out.add(f.value.id)
    return out


def stage_reads(stage: str) -> set[str]:
    """The parser options a stage's code reads: its module's, and those of the non-stage bench
    modules it hands ``args`` to, transitively (another stage's module is that stage's)."""
    dests, reads, seen, todo = _dests(), set(), set(), [stage]
    while todo:
        name = todo.pop()
        path = BENCH / f"{name}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        tree = ast.parse(path.read_text())
        reads |= _args_read(tree)
        todo += [m for m in _handed_args(tree) if m not in STAGES]
    return (reads & dests) - COMMON


def test_every_stage_declares_options_the_parser_has():
    dests = _dests()
    for stage in STAGES:
        module = _stage_module(stage)
        assert isinstance(getattr(module, "OPTIONS", None), frozenset), f"{stage} declares no OPTIONS"
        assert module.OPTIONS <= dests, f"{stage} declares options the parser lacks: {module.OPTIONS - dests}"
        assert not module.OPTIONS & COMMON, stage


def test_every_option_belongs_to_a_stage():
    declared = set().union(*(_stage_module(s).OPTIONS for s in STAGES))
    assert _dests() - COMMON - declared == set()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_declares_exactly_the_options_its_code_reads(stage):
    # Read but not declared: refused with the stage that uses it. Declared but never read: ignored.
    assert _stage_module(stage).OPTIONS == stage_reads(stage)


@pytest.mark.parametrize("stage, argv, flag, takers", [
    ("detect", ["--plot", "x.png", "--kv-window", "-3", "--concurrency", "abc"], "--plot", ["decode"]),
    ("serve", ["--top-k", "5"], "--top-k", ["decode"]),
    ("decode", ["--concurrency", "8"], "--concurrency", ["serve"]),
    ("memory", ["--model", "synthetic:tiny"], "--model",
     ["kernels", "decode", "prefill", "load", "quality", "kv", "serve"]),
    ("prefill", ["--temperature", "0.5"], "--temperature", ["decode", "serve"]),
    ("scheduler", ["--tokens", "5"], "--tokens", ["quality", "kv"]),
    ("kv", ["--mem-size-mib", "4"], "--mem-size-mib", ["memory"]),
    ("quality", ["--runs", "2"], "--runs", ["decode", "prefill", "kv", "serve"]),
    ("load", ["--new-tokens", "4"], "--new-tokens", ["decode", "serve"]),
    ("kernels", ["--deterministic"], "--deterministic", ["serve"]),
    ("decode", ["--load-readers", "2"], "--load-readers", ["load"]),
    ("serve", ["--kv-sinks", "2"], "--kv-sinks", ["kv"]),
])
def test_an_option_of_other_stages_is_refused_before_the_stage_runs(stage, argv, flag, takers, capsys, monkeypatch):
    from nexusrt.bench import main as main_mod

    real = main_mod._stage_module

    def guarded(name):
        module = real(name)
        if name != stage:
            return module

        def run(_args):
            raise AssertionError(f"the {stage} stage ran")

        return types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")
                                        and k != "run"}, run=run)

    monkeypatch.setattr(main_mod, "_stage_module", guarded)
    line = one_line_error(capsys, ["--stage", stage, "--backend", "cpu", *argv],
                           rf"{flag} applies to the .* --stage {stage} does not take it$")
    if len(takers) == 1:
        assert f"{flag} applies to the {takers[0]} stage only (--stage {takers[0]})" in line
    else:
        names = ", ".join(takers[:-1]) + f" and {takers[-1]}"
        stages = ", ".join(f"--stage {t}" for t in takers[:-1]) + f" or --stage {takers[-1]}"
        assert f"{flag} applies to the {names} stages ({stages}); --stage {stage} does not take it" in line


def test_an_option_left_at_its_default_is_not_given():
    parser = build_parser()
    args = parser.parse_args(["--stage", "detect", "--top-k", "0", "--prefill-path", "ragged", "--kv-window", "512"])
    refuse_other_stages_options(parser, args)  # equal to the defaults: nothing was asked of another stage
    args = parser.parse_args(["--stage", "detect", "--kv-window", "-3"])
    with pytest.raises(ValueError, match="--kv-window applies to the kv stage only"):
        refuse_other_stages_options(parser, args)


# -- options a backend ignores --------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--stage", "serve", "--deterministic"], "--deterministic"),
    (["--stage", "serve", "--prefill-path", "per-sequence"], "--prefill-path"),
    (["--stage", "serve", "--kv-gpu-budget", "1000000"], "--kv-gpu-budget"),
    (["--stage", "decode", "--decode-paths", "graph"], "--decode-paths"),
    (["--stage", "decode", "--persistent-profile"], "--persistent-profile"),
])
def test_options_read_on_cuda_only_are_refused_on_the_cpu(argv, flag, capsys, no_work):
    stage = argv[1]
    one_line_error(capsys, argv + ["--backend", "cpu", "--no-peers"],
                    rf"^nexusrt-bench: error: {flag} applies to the {stage} stage on CUDA only; "
                    r"this run's backend is cpu$")


def test_the_help_says_which_options_a_backend_ignores():
    text = " ".join(build_parser().format_help().split())
    for flag in ("--deterministic", "--decode-paths", "--persistent-profile", "--kv-gpu-budget"):
        assert re.search(rf"{flag}[^-]*? \S+ stage on CUDA \(refused on the CPU", text), flag
    assert "per-sequence is refused on the CPU" in text
    assert "on CUDA every rank is a worker process already" in text  # --tp-processes: accepted, said


# -- runs past the model's context ----------------------------------------------------------------
@pytest.mark.parametrize("argv, pattern", [
    (["--stage", "decode", "--new-tokens", "2100", "--prompt-tokens", "4"],
     r"--prompt-tokens 4 \+ --new-tokens 2100 = 2104 tokens exceed nexusrt:stdlib-tiny's context of 2048 tokens"),
    (["--stage", "decode", "--new-tokens", "2100", "--prompt-tokens", "4", "--tensor-parallel", "2"],
     r"--prompt-tokens 4 \+ --new-tokens 2100 = 2104 tokens exceed nexusrt:stdlib-tiny's context of 2048 tokens"),
    (["--stage", "decode", "--prompt-tokens", "100000", "--new-tokens", "2"],
     r"--prompt-tokens 100000 \+ --new-tokens 2 = 100002 tokens exceed .* context of 2048 tokens"),
    (["--stage", "serve", "--new-tokens", "2100", "--prompt-tokens", "4", "--concurrency", "1"],
     r"the longest request: --prompt-tokens 4 \(3 with the 0.75-1.25x spread\) \+ --new-tokens 2100 = 2103 tokens "
     r"exceed nexusrt:stdlib-tiny's context of 2048 tokens"),
    (["--stage", "serve", "--new-tokens", "2000", "--prompt-tokens", "40", "--shared-prefix", "30"],
     r"the longest request: --shared-prefix 30 \+ --prompt-tokens 40 \(\d+ with the 0.75-1.25x spread\) \+ "
     r"--new-tokens 2000 = \d+ tokens exceed .* context of 2048"),
])
def test_a_run_past_the_context_is_refused_before_the_model_loads(argv, pattern, capsys, no_work):
    one_line_error(capsys, argv + ["--backend", "cpu", "--runs", "1", "--no-peers"], pattern)


def test_the_decode_refusal_agrees_with_the_context_the_runner_gets():
    """time_generation asks LLM for prompt + new + 16 positions and LLM caps that at the model's
    context without a word; the refusal is of the sum past that capped context."""
    from nexusrt.bench.decode_timing import CONTEXT_SLACK, check_fits, decode_context
    from nexusrt.engine.fit import runner_context

    cfg = common.resolve_model_config("nexusrt:stdlib-tiny")
    assert decode_context(4, 2044) == 2048 + CONTEXT_SLACK
    assert runner_context(cfg, "cpu", decode_context(4, 2044)) == 2048  # the cap
    assert check_fits(cfg, "cpu", "m", 4, 2044) == 2048  # the whole context: fits (the loop writes 2047)
    with pytest.raises(ValueError, match=r"--prompt-tokens 4 \+ --new-tokens 2045 = 2049 tokens exceed m's context"):
        check_fits(cfg, "cpu", "m", 4, 2045)


def test_a_prefill_prompt_past_the_context_is_refused_before_the_model_loads(capsys, no_work, monkeypatch):
    # The CPU caps prompts at CPU_MAX_TOKENS (256); lifted here so that the context check is what refuses.
    from nexusrt.bench import prefill

    monkeypatch.setattr(prefill, "CPU_MAX_TOKENS", 10**6)
    one_line_error(capsys, ["--stage", "prefill", "--backend", "cpu", "--runs", "1", "--no-peers",
                            "--prompt-tokens", "512,2049"],
                   r"the longest --prompt-tokens = 2049 tokens exceed nexusrt:stdlib-tiny's context of 2048 tokens")


# -- one new token has no time per token ----------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--tensor-parallel", "2"]])
def test_one_new_token_is_refused_by_the_decode_stage(extra, capsys, no_work):
    one_line_error(capsys, ["--stage", "decode", "--backend", "cpu", "--new-tokens", "1", *extra],
                    r"--new-tokens must be >= 2 for the decode stage \(a time per token is the interval .*\), got 1$")
    help_text = " ".join(build_parser().format_help().split())
    assert "decode stage: tokens generated, >= 2" in help_text and "serve stage: tokens each request generates, >= 1" \
        in help_text


# -- --plot: checked before the run ---------------------------------------------------------------
@pytest.mark.parametrize("path, pattern", [
    ("", r"--plot needs a file name \(FILE.png\), got ''$"),
    ("/nonexistent-folder-nexusrt/x.png", r"--plot '/nonexistent-folder-nexusrt/x.png': the folder "
                                          r"/nonexistent-folder-nexusrt does not exist$"),
])
def test_a_plot_that_could_not_be_written_is_refused_first(path, pattern, capsys, no_work):
    one_line_error(capsys, ["--stage", "decode", "--backend", "cpu", "--plot", path], pattern)


def test_a_plot_in_an_unwritable_folder_is_refused_first(capsys, no_work, tmp_path):
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    one_line_error(capsys, ["--stage", "decode", "--backend", "cpu", "--plot", "/proc/x.png"],
                    r"--plot '/proc/x.png': the folder /proc is not writable")
    one_line_error(capsys, ["--stage", "decode", "--backend", "cpu", "--plot", str(tmp_path)],
                    r"is a directory; give a file name")


def test_a_plot_without_matplotlib_is_refused_first(capsys, no_work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    one_line_error(capsys, ["--stage", "decode", "--backend", "cpu", "--plot", str(tmp_path / "x.png")],
                    r"--plot needs matplotlib, which does not import here")


def test_a_plot_format_matplotlib_does_not_write_is_refused(tmp_path, monkeypatch):
    fake = types.ModuleType("matplotlib")
    fake.__version__ = "9.9"
    bases = types.ModuleType("matplotlib.backend_bases")
    bases.FigureCanvasBase = type("FigureCanvasBase", (), {
        "get_supported_filetypes": classmethod(lambda cls: {"png": "Portable Network Graphics", "pdf": "PDF"})})
    monkeypatch.setitem(sys.modules, "matplotlib", fake)
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", bases)
    decode.check_plot(str(tmp_path / "x.png"))
    decode.check_plot(str(tmp_path / "x"))  # no extension: matplotlib's default format
    with pytest.raises(ValueError, match=r"writes no .foo files; give one of .pdf, .png"):
        decode.check_plot(str(tmp_path / "x.foo"))
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


# -- the kv stage's pruning budget, named by the bench's flags ------------------------------------
@pytest.mark.parametrize("argv, pattern", [
    (["--kv-window", "16", "--tokens", "16"],
     r"--kv-sinks 4 fill the smallest budget, 25% of --kv-window 16 \(4 tokens\): the budget must hold more than "
     r"the sinks; give --kv-window >= 20 or --kv-sinks <= 3$"),
    (["--kv-window", "64", "--kv-sinks", "100"],
     r"--kv-sinks 100 fill .* give --kv-window >= 404 or --kv-sinks <= 15$"),
    (["--kv-sinks", "-1"], r"--kv-sinks must be >= 0, got -1$"),
    (["--kv-window", "4096"], r"--kv-window 4096 is longer than nexusrt:stdlib-tiny's context of 2048 tokens"),
    (["--kv-contexts", "8192"], r"--kv-contexts applies to the kv stage's speed half; --kv-part quality does not"),
    (["--model", "synthetic:tiny"], r"--model applies to the kv stage's speed half; --kv-part quality does not"),
])
def test_the_kv_quality_half_refuses_what_it_cannot_run_before_loading(argv, pattern, capsys, no_work):
    line = one_line_error(capsys, ["--stage", "kv", "--backend", "cpu", "--kv-part", "quality", *argv], pattern)
    assert "kv_budget" not in line


def test_the_kv_speed_half_refuses_the_quality_half_options(capsys, no_work):
    one_line_error(capsys, ["--stage", "kv", "--backend", "cpu", "--kv-part", "speed", "--kv-window", "64"],
                    r"--kv-window applies to the kv stage's quality half; --kv-part speed does not run it$")


def test_the_smallest_window_named_is_enough():
    from nexusrt.serving.pruning import KvPolicy

    def refusal(window, sinks):
        try:
            kv._check_quality_args(types.SimpleNamespace(kv_window=window, kv_sinks=sinks, tokens=None))
        except ValueError as exc:
            return str(exc)
        return None

    assert refusal(8, 1) is None  # a budget of 2 holds one sink
    for sinks in (2, 4, 7, 100):
        least = int(re.search(r"--kv-window >= (\d+)", refusal(8, sinks)).group(1))
        assert refusal(least - 1, sinks) is not None and refusal(least, sinks) is None, sinks
        for f in kv.FRACTIONS:  # the policies run_quality builds at that window take it
            KvPolicy("sink-window", int(f * least), sinks)
            KvPolicy("h2o", int(f * least), sinks)


# -- the serve stage's KV pool --------------------------------------------------------------------
def test_a_kv_pool_past_the_host_memory_names_kv_memory(capsys, no_work, monkeypatch):
    monkeypatch.setattr(common, "host_available", lambda: (8 << 30, "MemAvailable"))
    line = one_line_error(capsys, ["--stage", "serve", "--backend", "cpu", "--no-peers", "--kv-memory",
                                    "99999999999999"],
                           r"--kv-memory 99999999999999 \(the KV pool, fp32 on the CPU\) needs 90.9 TiB of host "
                           r"memory but this machine has 8.0 GiB available now \(MemAvailable\)")
    assert "--max-context" not in line
    monkeypatch.setattr(common, "host_available", lambda: (1 << 30, "MemAvailable"))  # a block each fits
    one_line_error(capsys, ["--stage", "serve", "--backend", "cpu", "--no-peers", "--concurrency", "4096"],
                    r"--concurrency 4096 requests of up to \d+ tokens at once \(their KV pool, fp32 on the CPU\) "
                    r"needs .* of host memory but this machine has 1.0 GiB available now")


def test_a_kv_pool_the_runner_cannot_make_names_the_flag(monkeypatch):
    def no_room(*_a, **_k):
        raise MemoryError("the device arena cannot hold 40.0 GiB")

    monkeypatch.setattr(serve, "_batch_runner", no_room)
    args = types.SimpleNamespace(kv_memory=43 << 30, kv_gpu_budget=None)
    with pytest.raises(ValueError, match=r"^--kv-memory 46170898432 bytes: the KV pool does not fit the device "
                                         r"memory \(the device arena cannot hold 40.0 GiB\); give fewer bytes$"):
        serve._pool_runner(None, False, 10, args, 4, 2048, False, "ragged")
    args.kv_memory = None
    with pytest.raises(ValueError, match=r"--concurrency 4 requests at once \(10 blocks\) does not fit"):
        serve._pool_runner(None, False, 10, args, 4, 2048, False, "ragged")


def test_request_sizes_are_the_workloads():
    for n, p, new, shared in ((7, 100, 5, 10), (3, 1, 2, 0)):
        assert serve.request_sizes(n, p, new, shared) == [len(ids) + m for ids, m in
                                                         serve.workload(n, p, new, shared, 4096)]

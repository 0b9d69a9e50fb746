"""``nexusrt-bench``: measure one layer of the runtime on this machine.

Each stage is a module ``nexusrt.bench.<stage>`` with ``add_arguments(parser)``,
``run(args) -> dict`` (the JSON result), ``render(result) -> str`` (the table) and ``OPTIONS``.

**Which stage takes which option.** The parser is one for every stage, so every option parses
with any ``--stage``; an option a stage does not read would be silently ignored, and the run would
print figures of something the user did not ask for. So each stage module declares ``OPTIONS``,
the set of the parser's ``dest`` names it reads besides :data:`COMMON` (a helper module that
reads some, as :mod:`.decode_tp` or :mod:`.kv_speed`, declares its own ``OPTIONS`` and the stage
that uses it adds them to its own). Before a stage runs, every option outside :data:`COMMON`
whose value differs from its default and that the chosen stage does not declare is refused,
naming the stages that take it (:func:`refuse_other_stages_options`). Options shared by several
stages (``--model``, ``--prompt-tokens``, ``--runs``, ...) are declared by each stage that reads
them, whichever module registered them (:func:`.common.add_shared_argument`). A test
(tests/test_bench_refusals.py) reads each stage's code, its module and the non-stage bench
modules it hands ``args`` to, and checks that its ``OPTIONS`` are exactly the options that code
reads, that every declared option exists and that every option has a stage.

Options a stage reads on one backend only (``--deterministic``, ``--prefill-path`` and
``--kv-gpu-budget`` of the serve stage, ``--decode-paths`` and ``--persistent-profile`` of the
decode stage: CUDA) are refused by the stage itself on the other backend, once it knows which
one it runs on, before any model loads (:func:`.common.refuse_off_backend`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from ..cli.parsing import OneLineParser, parse_args
from ..cli.streams import protect_standard_streams, require_stdout

STAGES = {
    "detect": "device, profile, features and boot phase times",
    "memory": "page map costs, arena vs cuMemAlloc, copy bandwidths",
    "scheduler": "launch, graph-node and doorbell costs, vs PyTorch",
    "kernels": "each decode kernel alone, as GB/s and % of measured bandwidth",
    "decode": "ms per token against the floor and PyTorch peers",
    "prefill": "time to first token against the compute floor and HF transformers",
    "load": "weight loading speed per path against plain file reads",
    "quality": "held-out perplexity (stdlib text), beside HF transformers' on the same tokens",
    "kv": "KV pruning quality (perplexity, top-1 vs full) on stdlib-tiny; on CUDA, decode at 8k-128k with "
          "half the KV on the host tier, restoring it, and a pruned cache",
    "serve": "the serving engine under N concurrent requests: tokens/s, TTFT, TPOT, KV blocks",
}
# Options every stage takes (main reads --json and --debug; every stage boots with --profile, --backend).
COMMON = frozenset({"help", "stage", "json", "profile", "backend", "debug"})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(  # usage errors: one line, status 1, as every other error
        prog="nexusrt-bench",
        description="Measure NexusRT on this machine. Every figure is measured here, in this run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {k:<10} {v}" for k, v in STAGES.items()),
    )
    parser.add_argument("--stage", default="detect", choices=sorted(STAGES), metavar="STAGE",
                        help="what to measure (default: detect); see the list below")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--profile", default="auto", help="hardware profile name or 'auto' (default)")
    parser.add_argument("--backend", choices=("cpu", "cuda"), default=None,
                        help="force a backend (default: NEXUSRT_BACKEND, else probe)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also NEXUSRT_DEBUG=1)")
    for stage in STAGES:
        module = _stage_module(stage)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    return parser


def _stage_module(stage: str):
    try:
        return importlib.import_module(f"nexusrt.bench.{stage}")
    except ModuleNotFoundError as exc:
        if exc.name == f"nexusrt.bench.{stage}":
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    """Run ``nexusrt-bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    protect_standard_streams()  # a closed stderr drops the notices; the figures still come out
    try:
        parser = build_parser()  # imports every stage module (NumPy and more): a second or so
    except KeyboardInterrupt:  # before the guard below exists: one line, as it would say
        print("nexusrt-bench: interrupted", file=sys.stderr)
        return 130
    args, status = parse_args(parser, argv)
    if args is None:  # --help (0) or a usage error, already said in one line (1)
        return status
    module = _stage_module(args.stage)
    if module is None:
        print(f"nexusrt-bench: error: stage {args.stage!r} is not available in this build", file=sys.stderr)
        return 1
    from ..cli.guard import guarded

    def run() -> int:
        require_stdout("nowhere to write the figures")  # before any stage boots a device
        refuse_other_stages_options(parser, args)
        # What the user gave, for a stage that refuses some of its own options in some modes (kv's halves).
        args.given_flags = {a.dest: flag_of(a) for a in given_options(parser, args)}
        try:
            result = module.run(args)
        finally:
            from .. import firmware

            firmware.shutdown()
        if args.json:
            print(json.dumps(result, indent=2, default=_json_default))
        else:
            print(module.render(result))
        return 0

    return guarded("nexusrt-bench", run, args.debug)


def stage_options() -> dict[str, frozenset[str]]:
    """Each available stage's ``OPTIONS``: the parser dests it reads besides :data:`COMMON`."""
    out = {}
    for stage in STAGES:
        module = _stage_module(stage)
        if module is not None:
            out[stage] = frozenset(getattr(module, "OPTIONS", ()))
    return out


def flag_of(action) -> str:
    """The long form of an option (``--mem-size-mib``), as the messages name it."""
    return max(action.option_strings, key=len)


def given_options(parser, args) -> list:
    """The parser's actions outside :data:`COMMON` whose value in ``args`` differs from the default
    (and ``--model`` whenever it was given: ``args.model_explicit``, set by its action)."""
    out = []
    for action in parser._actions:
        if not action.option_strings or action.dest in COMMON:
            continue
        default = action.default
        if isinstance(default, str) and callable(action.type):
            default = action.type(default)  # argparse converts a string default the same way
        explicit = action.dest == "model" and getattr(args, "model_explicit", False)
        if explicit or getattr(args, action.dest, default) != default:
            out.append(action)
    return out


def refuse_other_stages_options(parser, args) -> None:
    """Refuse an option given with a stage that does not read it (see the module docstring):
    ignored, it would print figures of something the user did not ask for."""
    owners = stage_options()
    for action in given_options(parser, args):
        takers = [s for s, opts in owners.items() if action.dest in opts]
        if not takers or args.stage in takers:
            continue
        flag = flag_of(action)
        if len(takers) == 1:
            where = f"the {takers[0]} stage only (--stage {takers[0]})"
        else:
            names = ", ".join(takers[:-1]) + f" and {takers[-1]}"
            stages = ", ".join(f"--stage {t}" for t in takers[:-1]) + f" or --stage {takers[-1]}"
            where = f"the {names} stages ({stages})"
        raise ValueError(f"{flag} applies to {where}; --stage {args.stage} does not take it")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())

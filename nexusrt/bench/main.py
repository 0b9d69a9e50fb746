"""``nexusrt-bench``: measure one layer of the runtime on this machine.

Each stage is a module ``nexusrt.bench.<stage>`` with ``add_arguments(parser)``,
``run(args) -> dict`` (the JSON result) and ``render(result) -> str`` (the table).
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
    parser = build_parser()
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
        _refuse_other_stages_options(args)
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


def _refuse_other_stages_options(args) -> None:
    """An option a stage lists in its ``OWN_OPTIONS`` (``dest -> flag``), given with another stage,
    is an error: ignored, it would print figures of something the user did not ask for."""
    for stage in STAGES:
        module = _stage_module(stage) if stage != args.stage else None
        for dest, flag in (getattr(module, "OWN_OPTIONS", None) or {}).items():
            if getattr(args, dest, None) not in (None, False):
                raise ValueError(f"{flag} applies to the {stage} stage only (--stage {stage}); "
                                 f"--stage {args.stage} does not take it")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())

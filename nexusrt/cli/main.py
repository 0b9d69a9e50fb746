"""``nexusrt``: the command line.

    nexusrt generate [--model DIR|synthetic:NAME|nexusrt:NAME] --prompt TEXT [--max-new-tokens N]
                     [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR]
                     [--chat] [--json] [--backend cpu|cuda] [--max-context N]

The completion streams to stdout and the stats go to stderr; ``--json`` prints one
object instead. Expected errors (bad files, bad arguments) print one line to stderr and
exit with 1, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import NexusRTError


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a completion; streams to stdout, stats to stderr.")
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, a shipped model (nexusrt:stdlib-tiny, the default) or random "
                        "weights (synthetic:tiny / synthetic:llama-3.2-1b / synthetic:llama-3.1-8b)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 is greedy (default: generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K best (0 = no limit)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--backend", choices=("cpu", "cuda"), default=None,
                   help="force a backend (default: NEXUSRT_BACKEND, else probe)")
    p.add_argument("--max-context", type=int, default=None, metavar="N", help="cap the KV cache at N tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexusrt", description="NexusRT: LLM inference that owns the GPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    return parser


def _generate(args) -> int:
    from ..engine.llm import LLM
    from ..models.shipped import DEFAULT_MODEL

    if args.model is None:
        args.model = DEFAULT_MODEL
        print(f"nexusrt: no --model given: using {DEFAULT_MODEL} (a small model trained on Python's "
              "standard library, shipped with nexusrt)", file=sys.stderr)
    llm = LLM(args.model, backend=args.backend, max_context=args.max_context)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, stop=args.stop, seed=args.seed, chat=args.chat)
    try:
        if args.json:
            result = llm.generate(args.prompt, **kwargs)
            out = result.to_dict()
            out.update(model=args.model, backend=llm.backend, load_s=llm.load_s)
            print(json.dumps(out))
            return 0
        for piece in llm.stream(args.prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        r = llm.last_result
        print(f"[{llm.backend}] prompt {r.prompt_tokens} tokens, generated {len(r.token_ids)} "
              f"({r.finish_reason}); load {llm.load_s:.2f} s, ttft {r.ttft_s * 1e3:.1f} ms, "
              f"{r.tokens_per_s:.1f} tokens/s, seed {r.seed}", file=sys.stderr)
        return 0
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _generate(args)
    except (NexusRTError, ValueError) as exc:
        print(f"nexusrt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nexusrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `nexusrt generate ... | head`: the reader left, not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    finally:
        from .. import firmware

        firmware.shutdown()


if __name__ == "__main__":
    sys.exit(main())

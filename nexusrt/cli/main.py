"""``nexusrt``: the command line.

    nexusrt generate [--model MODEL] (--prompt TEXT | --prompt - | --prompt-file F) [--system TEXT]
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                     [--stop STR] [--chat] [--json] [--backend cpu|cuda] [--max-context N] [--tensor-parallel N [--tp-processes]]
                     [--kv-policy full|sink-window|h2o] [--kv-budget TOKENS] [--kv-sinks N] [--kv-window N]
    nexusrt chat [--model MODEL] [--system TEXT] [sampling and backend options as above]
    nexusrt serve [--model MODEL] [--host 127.0.0.1] [--port 8000] [--max-batch N] [--kv-memory BYTES]
                  [--max-waiting N] [--max-context N] [--tensor-parallel N [--tp-processes]] [--drain-seconds S]
                  [--kv-policy ... as generate]
    nexusrt --version

MODEL is a checkpoint directory, a shipped ``nexusrt:<name>`` (``nexusrt:stdlib-tiny``, the
default, said once on stderr), ``synthetic:<preset>``, or a Hugging Face repo id
(``org/name``) already in the local Hugging Face cache. ``generate`` streams the completion
to stdout and the stats to stderr; ``--json`` prints one object instead. Every error prints
one line to stderr and exits with 1; ``--debug`` (or ``NEXUSRT_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import __version__
from .guard import guarded
from .parsing import OneLineParser, int_range, parse_args
from .streams import protect_standard_streams, require_stdin, require_stdout

MODEL_HELP = ("checkpoint directory, nexusrt:stdlib-tiny (the default: shipped, trained), "
              "synthetic:tiny / synthetic:llama-3.2-1b / synthetic:llama-3.1-8b, "
              "or a Hugging Face repo id org/name in the local HF cache (never downloaded)")


def _load_flags(p) -> None:
    """The flags that choose and load a model, shared by generate, chat and serve."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="cap the KV cache (and so the tokens of one sequence) at N")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N ranks (CPU: in process, or --tp-processes; CUDA: one worker process "
                        "per GPU with NCCL, serve batching over them; not yet run on several GPUs)")
    p.add_argument("--tp-processes", action="store_true",
                   help="CPU: run each tensor-parallel rank in its own worker process")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder outside the checkpoint its symlinks may lead into (repeatable)")
    p.add_argument("--kv-gpu-budget", default=None, metavar="BYTES",
                   help="bytes of KV cache kept on the GPU, e.g. 2G (CUDA): one sequence's oldest blocks past it "
                        "live in pinned host memory, read zero-copy; the serving engine caps its pool with it and "
                        "swaps the requests it preempts to pinned host memory instead of recomputing them")
    p.add_argument("--kv-fault-reserve", default=None, metavar="BYTES",
                   help="with --kv-gpu-budget: bytes of extra GPU KV, free at first, that the fault ring fills: "
                        "decode attention posts the host blocks it reads and the runner moves them in between "
                        "steps (at least one KV block, at most the host tier; generate and chat only)")
    p.add_argument("--backend", choices=("cpu", "cuda"), default=None,
                   help="force a backend (default: NEXUSRT_BACKEND, else probe)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also NEXUSRT_DEBUG=1)")


def _common(p) -> None:
    _load_flags(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt for the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 is greedy (default: generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K best (0 = no limit)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string (repeatable)")


def _kv_flags(p) -> None:
    p.add_argument("--kv-policy", choices=("full", "sink-window", "h2o"), default=None,
                   help="KV pruning policy (default full; the others run in the serving engine: "
                        "sink-window and h2o on CPU and CUDA)")
    p.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS", help="most tokens the KV cache keeps")
    p.add_argument("--kv-sinks", type=int, default=None, metavar="N", help="leading tokens never evicted (4)")
    p.add_argument("--kv-window", type=int, default=None, metavar="N",
                   help="recent tokens never evicted (h2o; default budget/2 - sinks/2)")


def kv_options(args) -> dict:
    """The ``kv_*`` keyword arguments the KV flags ask for (only those given)."""
    given = {"kv_policy": args.kv_policy, "kv_budget": args.kv_budget, "kv_sinks": args.kv_sinks,
             "kv_window": args.kv_window}
    return {k: v for k, v in given.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nexusrt", description="NexusRT: LLM inference that owns the GPU.")
    parser.add_argument("--version", action="version", version=f"nexusrt {__version__}")
    # required: a bare `nexusrt` is a usage error like any other (one line, status 1)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a completion; streams to stdout, stats to stderr.")
    _common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text, or - to read it from stdin")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (UTF-8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template "
                                                       "(implied by --system)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming "
                                                       "(with a kv object: policy, tokens kept / evicted, blocks)")
    _kv_flags(p)
    c = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with a model: history kept, /reset clears it, /exit quits; replies stream.")
    _common(c)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics; concurrent requests are batched by the serving engine "
                                   "(continuous batching, paged KV, prefix caching). SIGTERM drains and exits.")
    _load_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int_range(0, 65535), default=8000,
                   help="port, 0..65535 (default 8000; 0: any free port)")
    s.add_argument("--max-batch", type=int, default=32, metavar="N", help="most requests running at once (32)")
    s.add_argument("--kv-memory", default=None, metavar="BYTES",
                   help="bytes of the KV block pool, e.g. 268435456 or 256M (default: CPU 256M; CUDA room "
                        "for --max-batch requests at full context)")
    s.add_argument("--deterministic", action="store_true",
                   help="CUDA: a request's tokens do not depend on the requests batched with it "
                        "(prefix caching off; the CPU backend always is)")
    s.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="queued requests beyond which new ones get HTTP 429 (256)")
    s.add_argument("--drain-seconds", type=float, default=4.0, metavar="S",
                   help="after SIGTERM, seconds requests in flight may take before they are cancelled (4; at most 7)")
    _kv_flags(s)
    return parser


def _bytes_flag(value, flag: str) -> int | None:
    """A byte-count flag's value in bytes (K, M, G suffixes as --kv-memory), or None when not given."""
    from ..server.run import parse_bytes

    return None if value is None else parse_bytes(value, flag)


def _serve(args) -> int:
    from ..server.run import serve
    from .address import check_can_listen

    if args.kv_fault_reserve is not None:
        raise ValueError("--kv-fault-reserve: the server's batched engine has no fault ring (its host tier swaps "
                         "preempted requests; the ring is generate and chat only)")
    kv = _bytes_flag(args.kv_memory, "--kv-memory")
    check_can_listen(args.host, args.port)  # a busy port or a bad --host: one line now, not after the load
    return serve(args.model, args.host, args.port, args.max_batch, kv, args.max_context, args.max_waiting,
                 args.allow_path, args.drain_seconds, kv_options(args), args.tensor_parallel, args.backend,
                 args.deterministic, _bytes_flag(args.kv_gpu_budget, "--kv-gpu-budget"), args.tp_processes)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, stop=args.stop, seed=args.seed)


def _check_streams(args) -> None:
    """Fail before the model loads when a stream the command needs was closed (``<&-``, ``>&-``)."""
    if args.command == "chat":
        require_stdin("nexusrt chat reads each turn from it")
    elif args.prompt == "-":
        require_stdin("--prompt - reads the prompt from it")
    require_stdout("nowhere to write the reply" if args.command == "chat" else "nowhere to write the completion")


def _generate(llm, args) -> int:
    from .prompt import read_prompt

    prompt = read_prompt(args)
    kwargs = dict(_sampling(args), chat=args.chat, system=args.system, **kv_options(args))
    if args.json:
        out = llm.generate(prompt, **kwargs).to_dict()
        out.update(model=args.model, backend=llm.backend, load_s=llm.load_s)
        print(json.dumps(out))
        return 0
    for piece in llm.stream(prompt, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = llm.last_result
    print(f"[{llm.backend}] prompt {r.prompt_tokens} tokens, generated {len(r.token_ids)} "
          f"({r.finish_reason}); load {llm.load_s:.2f} s, ttft {r.ttft_s * 1e3:.1f} ms, "
          f"{r.tokens_per_s:.1f} tokens/s, seed {r.seed}", file=sys.stderr)
    return 0


def _run(args) -> int:
    from ..engine.llm import LLM
    from ..models.shipped import DEFAULT_MODEL

    if args.model is None:
        args.model = DEFAULT_MODEL
        print(f"nexusrt: no --model given: using {DEFAULT_MODEL} (a small model trained on Python's "
              "standard library, shipped with nexusrt)", file=sys.stderr)
    if args.command == "serve":
        return _serve(args)
    _check_streams(args)
    llm = LLM(args.model, backend=args.backend, max_context=args.max_context, allow_paths=args.allow_path,
              tensor_parallel=args.tensor_parallel, tp_processes=args.tp_processes,
              kv_gpu_budget=_bytes_flag(args.kv_gpu_budget, "--kv-gpu-budget"),
              kv_fault_reserve=_bytes_flag(args.kv_fault_reserve, "--kv-fault-reserve"))
    try:
        if args.command == "chat":
            from .chat import run_chat

            return run_chat(llm, args.system, _sampling(args))
        return _generate(llm, args)
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    protect_standard_streams()  # before anything prints or opens a file
    parser = build_parser()
    args, status = parse_args(parser, argv)
    if args is None:
        return status

    def run() -> int:
        try:
            return _run(args)
        finally:
            from .. import firmware

            firmware.shutdown()

    return guarded("nexusrt", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())

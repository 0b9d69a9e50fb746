"""``nexusrt-bench --stage decode``: ms per decode token against the floor and PyTorch peers.

Batch 1, a ``--prompt-tokens`` prompt (32), ``--new-tokens`` new tokens (128), greedy (or
sampled: ``--temperature`` with ``--top-k`` / ``--top-p``, seed 0), one warm-up then the median
of ``--runs`` runs (5; with ``--versus-greedy`` each run is paired with a greedy one on the same
model, in alternating order, and the stage reports sampled − greedy per token, the median of the
pairs' differences). The floor is the bytes one token must read
(every weight once, plus the KV cache at the average context) divided by the read
bandwidth measured on this card in this run by the membw probe. When torch with CUDA is
importable, a PyTorch eager loop and a ``torch.compile(mode="reduce-overhead")`` loop of the
same shapes run in the same process, and NexusRT's speed is given as a ratio to each.

On CUDA the decode step is timed on each path of ``--decode-paths`` (default: the CUDA-graph
chain and the persistent kernel, ``NEXUSRT_DECODE``'s two values), one after the other in the
same process; the headline figures are those of the path ``NEXUSRT_DECODE`` selects (``graph``
unless set), and each other path is reported beside it with its own fraction of the floor, or
with the reason it could not run (a device that is not sm_90, a shape the kernel does not take).

``--tensor-parallel N`` (N > 1) times the model split over N ranks beside TP=1 instead, the
graph path only (:mod:`.decode_tp`); without it, or with 1, the stage is the one above.
"""

from __future__ import annotations

import dataclasses
import os
import statistics

from ..errors import ModelError
from ..models.shipped import DEFAULT_MODEL
from .common import (add_model_argument, add_shared_argument, env_set, int_list, prompt_ids, refuse_off_backend,
                     resolve_model_config, writable_folder_problem)
from . import decode_tp
from .decode_timing import MIN_NEW_TOKENS, bytes_per_token, check_fits, pick_text, time_generation
from .table import plain, table

CPU_MODEL = DEFAULT_MODEL  # the shipped trained model: small enough for NumPy
DEFAULT_PATHS = "graph,persistent"
# The options this stage reads (nexusrt-bench refuses them with another stage; see main's docstring).
OPTIONS = frozenset({"model", "prompt_tokens", "new_tokens", "runs", "no_peers", "plot", "temperature", "top_k",
                     "top_p", "decode_paths", "persistent_profile", "versus_greedy"}) | decode_tp.OPTIONS


def add_arguments(parser) -> None:
    add_model_argument(parser)
    add_shared_argument(parser, "--prompt-tokens", default=None, metavar="N[,N...]",
                        help="decode stage: prompt length (32); prefill stage: lengths to time (512,2048,8192)")
    parser.add_argument("--new-tokens", type=int, default=128, metavar="N",
                        help=f"decode stage: tokens generated, >= {MIN_NEW_TOKENS} (a time per token is the interval "
                             "from the first to the last); serve stage: tokens each request generates, >= 1. Prompt + "
                             "new tokens must fit the model's context (default 128)")
    add_shared_argument(parser, "--runs", type=int, default=None, metavar="R",
                        help="timed runs, median reported (decode 5, prefill 3, serve 3, kv 3)")
    add_shared_argument(parser, "--no-peers", action="store_true", help="decode/prefill stages: skip the PyTorch peers")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="decode stage: draw ms/token against the floor and peers (needs matplotlib; the folder "
                             "must exist and be writable: both checked before the run)")
    add_shared_argument(parser, "--temperature", type=float, default=0.0, metavar="T",
                        help="decode stage: sample every token at temperature T (with --top-k/--top-p, seed 0); "
                             "0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="decode stage, with --temperature: the K most likely tokens (0: the 1024 cap)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="decode stage, with --temperature: the nucleus of mass P (1.0: none)")
    parser.add_argument("--decode-paths", default=None, metavar="P[,P...]",
                        help="decode stage on CUDA (refused on the CPU, whose runner has one path): the "
                             "NEXUSRT_DECODE paths to time, each beside the others (graph,persistent); the headline "
                             "is the path NEXUSRT_DECODE selects")
    parser.add_argument("--persistent-profile", action="store_true",
                        help="decode stage on CUDA (refused on the CPU), an sm_90 GPU: one more run of the "
                             "persistent kernel with each instruction's clocks recorded, reported per phase (waits, "
                             "work, GB/s while working)")
    parser.add_argument("--versus-greedy", action="store_true",
                        help="decode stage, with --temperature: also generate greedily on the same model, "
                             "alternating with the sampled runs, and report sampled - greedy per token "
                             "(median of the pairs)")
    decode_tp.add_arguments(parser)


def _validate(args) -> None:
    lengths = int_list(args.prompt_tokens, (32,), "--prompt-tokens")
    if len(lengths) != 1:
        raise ValueError(f"the decode stage takes one --prompt-tokens value, got {args.prompt_tokens!r}")
    args.prompt_tokens = lengths[0]
    args.runs = 5 if args.runs is None else args.runs
    from ..backends.cuda.persistent import MODES

    given = getattr(args, "decode_paths", None)  # None: the default, which --tensor-parallel may narrow
    args.decode_paths_given = given is not None  # refused on the CPU once the backend is known
    paths = [p.strip().lower() for p in str(DEFAULT_PATHS if given is None else given).split(",") if p.strip()]
    bad = [p for p in paths if p not in MODES]
    if not paths or bad or len(set(paths)) != len(paths):
        raise ValueError(f"--decode-paths takes distinct values among {', '.join(MODES)}, got {given!r}")
    args.decode_paths = paths
    decode_tp.validate(args, None if given is None else paths)
    from ..reference.sampling import SamplingParams

    # Checked here (a bad value is a usage error, exit 1) and kept for every path's runs.
    args.sampling = SamplingParams(temperature=float(getattr(args, "temperature", 0.0) or 0.0),
                                   top_k=int(getattr(args, "top_k", 0) or 0),
                                   top_p=float(getattr(args, "top_p", 1.0)), seed=0)
    for name in ("prompt_tokens", "runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < MIN_NEW_TOKENS:
        raise ValueError(f"--new-tokens must be >= {MIN_NEW_TOKENS} for the decode stage (a time per token is the "
                         f"interval from the first new token to the last), got {args.new_tokens}")
    check_plot(getattr(args, "plot", None))
    if getattr(args, "versus_greedy", False):
        if args.sampling.greedy:
            raise ValueError("--versus-greedy times sampled against greedy decoding: give --temperature > 0")
        if getattr(args, "tensor_parallel", 1) > 1:
            raise ValueError("--versus-greedy is for one device; leave out --tensor-parallel")


def run(args) -> dict:
    from .. import firmware
    from ..backends.cuda.persistent import ENV, decode_mode, device_reason

    _validate(args)
    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    refuse_off_backend(rt, "decode", "--decode-paths", getattr(args, "decode_paths_given", False))
    refuse_off_backend(rt, "decode", "--persistent-profile", bool(getattr(args, "persistent_profile", False)))
    model = args.model
    cfg = resolve_model_config(model)  # an unknown name or a bad directory fails here, on any backend
    note = ""
    if not rt.is_cuda and model != CPU_MODEL and not getattr(args, "model_explicit", False):
        note = f"CPU backend: ran {CPU_MODEL} instead of {model} (a CPU figure, not comparable to a GPU)"
        model = CPU_MODEL
        cfg = resolve_model_config(model)
    check_fits(cfg, rt.backend, model, args.prompt_tokens, args.new_tokens)  # before the model loads
    prompt = prompt_ids(args.prompt_tokens)
    if args.tensor_parallel > 1:  # TP=N beside TP=1, the graph path only (decode_tp.validate)
        result = decode_tp.run(args, rt, model, note, prompt)
        if args.plot:
            _plot(result, args.plot)
        return result
    headline = decode_mode()
    versus = bool(getattr(args, "versus_greedy", False))
    cfg, runs, load_s, host_launch_s = time_generation(model, prompt, args, f"{headline} path", versus_greedy=versus)
    others = {}
    if rt.is_cuda:
        for path in args.decode_paths:
            if path == headline:
                continue
            reason = device_reason(rt) if path == "persistent" else None
            if reason is not None:
                others[path] = {"skipped": reason}
                continue
            try:
                with env_set(**{ENV: path}):
                    others[path] = {"runs": time_generation(model, prompt, args, f"{path} path")[1]}
            except ModelError as e:  # a shape the persistent kernel does not take: said, not fatal
                others[path] = {"skipped": str(e)}
    ms = statistics.median(r["ms_per_token"] for r in runs)
    ttft = statistics.median(r["ttft_s"] for r in runs)
    avg_context = args.prompt_tokens + args.new_tokens / 2
    nbytes = bytes_per_token(cfg, avg_context)
    result = {
        "backend": rt.backend, "device": rt.profile.device_name, "profile": rt.profile.name, "model": model,
        "note": note, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "load_s": load_s, "ms_per_token": ms, "ms_per_token_runs": [r["ms_per_token"] for r in runs],
        "ttft_s": ttft, "tokens_per_s": 1e3 / ms, "sampling": dataclasses.asdict(args.sampling), "bytes_per_token": nbytes,
        "achieved_bytes_s": nbytes["total"] / (ms / 1e3), "host_launch_s_per_token": host_launch_s,
    }
    if versus:
        result["versus_greedy"] = _versus_greedy(runs)
    if rt.is_cuda:
        from ..kernels.ops.membw import measure_read_bandwidth

        bw = measure_read_bandwidth(rt)
        floor_ms = nbytes["total"] / bw * 1e3
        result.update(read_bandwidth_bytes_s=bw, floor_ms=floor_ms, fraction_of_floor=floor_ms / ms)
        result["decode_path"] = headline
        result["other_paths"] = {p: _path_figures(o, floor_ms) for p, o in others.items()}
        if not args.no_peers:
            result["peers"] = _peers(cfg, args, ms)
        if getattr(args, "persistent_profile", False):
            from .persistent_profile import profile_step

            reason = device_reason(rt)
            result["persistent_profile"] = ({"skipped": reason} if reason else
                                            profile_step(model, prompt, args.new_tokens))
    if args.plot:
        _plot(result, args.plot)
    return result


def _versus_greedy(runs: list[dict]) -> dict:
    """A sampled token's extra cost from runs timed in pairs (``time_generation(versus_greedy=True)``):
    each pair's difference, their median, and the greedy runs' median."""
    greedy = [r["greedy_ms_per_token"] for r in runs]
    delta = [(r["ms_per_token"] - r["greedy_ms_per_token"]) * 1e3 for r in runs]
    return {"greedy_ms_per_token": statistics.median(greedy), "greedy_ms_per_token_runs": greedy,
            "delta_us": statistics.median(delta), "delta_us_runs": delta}


def _path_figures(other: dict, floor_ms: float) -> dict:
    """Median ms/token and fraction of the floor of another decode path, or its skip reason."""
    if "runs" not in other:
        return other
    ms = statistics.median(r["ms_per_token"] for r in other["runs"])
    return {"ms_per_token": ms, "ms_per_token_runs": [r["ms_per_token"] for r in other["runs"]],
            "fraction_of_floor": floor_ms / ms}


def _peers(cfg, args, ms: float) -> dict:
    try:
        import torch

        if not torch.cuda.is_available():
            return {"skipped": "torch has no CUDA here"}
    except Exception as exc:  # torch missing or broken: the peers are optional
        return {"skipped": f"torch not importable: {exc}"}
    from .torch_peer import measure

    peers = measure(cfg, args.prompt_tokens, args.new_tokens, args.runs)
    for p in peers.values():
        if "ms_per_token" in p:
            p["nexusrt_speedup"] = p["ms_per_token"] / ms
    return peers


def check_plot(path: str | None) -> None:
    """Refuse, before the run, a ``--plot`` that could not be written at its end: an empty name,
    a folder, a folder that does not exist or is not writable, a format matplotlib does not
    write, or no matplotlib at all."""
    if path is None:
        return
    if not str(path).strip():
        raise ValueError("--plot needs a file name (FILE.png), got ''")
    if os.path.isdir(path):
        raise ValueError(f"--plot {path!r} is a directory; give a file name (FILE.png)")
    folder = os.path.dirname(os.path.abspath(path))
    why = writable_folder_problem(folder)
    if why is None and os.path.exists(path) and not os.access(path, os.W_OK):
        why = f"holds {os.path.basename(path)!r}, which is not writable"
    if why is not None:
        raise ValueError(f"--plot {path!r}: the folder {folder} {why}")
    try:
        import matplotlib
        from matplotlib.backend_bases import FigureCanvasBase
    except Exception as exc:
        raise ValueError(f"--plot needs matplotlib, which does not import here ({exc})") from None
    ext = os.path.splitext(path)[1][1:].lower()
    try:
        supported = FigureCanvasBase.get_supported_filetypes()
    except Exception:  # no list to check against: savefig says at the end
        supported = None
    if ext and supported and ext not in supported:
        raise ValueError(f"--plot {path!r}: matplotlib {matplotlib.__version__} writes no .{ext} files; "
                         f"give one of {', '.join('.' + k for k in sorted(supported))}")


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        raise ValueError(f"--plot needs matplotlib ({exc})") from None
    n = result.get("tensor_parallel", 1)
    names, values = ["NexusRT" if n == 1 else f"NexusRT TP={n}"], [result["ms_per_token"]]
    if "ms_per_token" in (result.get("tp1") or {}):
        names.append("NexusRT TP=1")
        values.append(result["tp1"]["ms_per_token"])
    for mode, p in (result.get("peers") or {}).items():
        if isinstance(p, dict) and "ms_per_token" in p:
            names.append(f"PyTorch {mode}")
            values.append(p["ms_per_token"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values, color=["#2a7"] + ["#888"] * (len(names) - 1))
    if "floor_ms" in result:
        which = "floor" if n == 1 else f"floor (TP={n}, one rank's bytes)"
        ax.axhline(result["floor_ms"], color="r", ls="--", label=f"{which} {result['floor_ms']:.3f} ms")
        ax.legend()
    ax.set_ylabel("ms per token (median)")
    ax.set_title(f"{result['model']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(r: dict) -> str:
    if r.get("tensor_parallel", 1) > 1:
        return decode_tp.render(r)
    rows = [["model", r["model"]], ["device", f"{r['device']} ({r['backend']}, profile {r['profile']})"],
            ["shape", f"batch 1, prompt {r['prompt_tokens']}, {r['new_tokens']} new tokens, median of {r['runs']}"],
            ["pick", pick_text(r.get("sampling"))],
            ["ms / token", f"{r['ms_per_token']:.4f}  (runs: {', '.join(f'{x:.3f}' for x in r['ms_per_token_runs'])})"],
            ["tokens / s", f"{r['tokens_per_s']:.1f}"], ["TTFT", f"{r['ttft_s'] * 1e3:.2f} ms"],
            ["bytes / token", f"{r['bytes_per_token']['total'] / 1e9:.3f} GB"],
            ["achieved", f"{r['achieved_bytes_s'] / 1e9:.0f} GB/s"]]
    v = r.get("versus_greedy")
    if v:
        rows.append(["sampled - greedy", f"{v['delta_us']:.1f} us/token, median of {len(v['delta_us_runs'])} pairs "
                                         f"({', '.join(f'{x:.1f}' for x in v['delta_us_runs'])}); "
                                         f"greedy {v['greedy_ms_per_token']:.4f} ms/token"])
    if r.get("host_launch_s_per_token") is not None:
        rows.append(["host launch / token", f"{r['host_launch_s_per_token'] * 1e6:.1f} us"])
    if "floor_ms" in r:
        rows += [["read BW (measured)", f"{r['read_bandwidth_bytes_s'] / 1e9:.0f} GB/s"],
                 ["floor", f"{r['floor_ms']:.4f} ms/token"], ["fraction of floor", f"{r['fraction_of_floor']:.1%}"]]
    if r.get("decode_path"):
        rows[4][0] = f"ms / token ({r['decode_path']})"
    for path, o in (r.get("other_paths") or {}).items():
        if "ms_per_token" in o:
            rows.append([f"{path} path", f"{o['ms_per_token']:.4f} ms/token ({o['fraction_of_floor']:.1%} of the floor; "
                                         f"{o['ms_per_token'] / r['ms_per_token']:.2f}x the {r['decode_path']} path)"])
        else:
            rows.append([f"{path} path", f"not run: {o['skipped']}"])
    for mode, p in (r.get("peers") or {}).items():
        if isinstance(p, dict) and "ms_per_token" in p:
            rows.append([f"PyTorch {mode}", f"{p['ms_per_token']:.4f} ms/token -> NexusRT {p['nexusrt_speedup']:.2f}x"])
        else:
            rows.append([f"PyTorch {mode}", plain(p)])
    if r.get("note"):
        rows.append(["note", r["note"]])
    text = table(["decode", ""], rows, title="NexusRT decode benchmark")
    prof = r.get("persistent_profile")
    if prof:
        from .persistent_profile import render as render_profile

        text += "\n\n" + (f"persistent profile: not run: {prof['skipped']}" if "skipped" in prof else render_profile(prof))
    return text

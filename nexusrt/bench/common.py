"""Arguments and helpers shared by several benchmark stages.

``--model`` is used by the kernels and decode stages; both call :func:`add_model_argument`,
which registers it once per parser (argparse raises on a second registration).
"""

from __future__ import annotations

import argparse
import contextlib
import os

MODEL_DEFAULT = "synthetic:llama-3.2-1b"
SYNTHETIC_PREFIX = "synthetic:"


class _ModelAction(argparse.Action):
    """Stores ``--model`` and records that it was given (``args.model_explicit``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.model_explicit = True


def add_model_argument(parser) -> None:
    """Add ``--model`` to ``parser`` unless a stage already did.

    ``args.model_explicit`` says whether the user named a model: a stage may substitute a
    smaller one for the default on the CPU, never for one asked for by name.
    """
    if "--model" in getattr(parser, "_option_string_actions", {}):
        return
    parser.set_defaults(model_explicit=False)
    parser.add_argument("--model", default=MODEL_DEFAULT, metavar="MODEL", action=_ModelAction,
                        help="kernels/decode/load/quality stages and the kv stage's speed half: 'synthetic:<preset>' "
                             "(e.g. synthetic:llama-3.1-8b), "
                             f"nexusrt:stdlib-tiny or a checkpoint directory (default {MODEL_DEFAULT}; on the CPU "
                             "the decode, prefill and load stages, and the quality stage anywhere, run nexusrt:stdlib-tiny "
                             "unless --model is given)")


def resolve_model_config(spec: str):
    """The ModelConfig of ``spec``: any name ``nrt.LLM`` takes (``synthetic:<preset>`` or a bare
    preset name, ``nexusrt:<name>``, a checkpoint directory, a cached repo id ``org/name``)."""
    from ..errors import ModelError
    from ..models.loader import model_config
    from ..models.presets import PRESETS
    from ..models.shipped import shipped_names

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--model must be 'synthetic:<preset>' or a checkpoint directory, got {spec!r}")
    try:
        return model_config(spec)
    except ModelError as exc:
        raise ValueError(f"--model {spec!r} is neither synthetic:<preset> ({', '.join(PRESETS)}), "
                         f"a shipped model ({', '.join(shipped_names())}), a cached repo id nor a checkpoint "
                         f"directory: {exc}") from None


def add_shared_argument(parser, *names, **kwargs) -> None:
    """Add an option several stages read (e.g. ``--prompt-tokens``) unless a stage already did;
    each stage gives it its own default when the user leaves it out (so pass ``default=None``)."""
    if names[0] in getattr(parser, "_option_string_actions", {}):
        return
    parser.add_argument(*names, **kwargs)


def int_list(text: str | None, default: tuple[int, ...], what: str) -> list[int]:
    """``"512,2048"`` -> ``[512, 2048]``; each a positive int, else ValueError naming ``what``."""
    if text is None:
        return list(default)
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise ValueError(f"{what} takes comma-separated positive integers, got {text!r}") from None
        if v < 1:
            raise ValueError(f"{what} values must be >= 1, got {v}")
        out.append(v)
    if not out:
        raise ValueError(f"{what} is empty")
    return out


@contextlib.contextmanager
def env_set(**values: str):
    """The environment variables ``values`` set while the block runs (a runner built inside reads
    them, as a user's switches), then each restored: to its old value, or removed."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def host_available() -> tuple[int, str]:
    """(bytes, where the figure came from) that a new allocation on this machine can still get
    now: ``MemAvailable`` (else the free physical pages), lowered by a cgroup limit or
    ``RLIMIT_AS`` where tighter (:func:`nexusrt.engine.fit.cpu_available`, as the model fit check)."""
    from ..engine.fit import cpu_available  # here, not at the top: engine.fit pulls in the model stack

    return cpu_available()


def check_memory(need: int, what: str, hint: str = "", available: tuple[int, str] | None = None,
                 where: str = "host", verb: str = "needs") -> None:
    """Refuse, before any of it is allocated, a run whose ``need`` (bytes) of ``where`` memory exceeds
    ``available`` (bytes, where that figure came from; default :func:`host_available`); ``what``
    names the flags that ask for it (the message's subject, then ``verb``), ``hint`` how to ask for less."""
    from .table import human_bytes

    free, source = host_available() if available is None else available
    if need > free:
        raise ValueError(f"{what} {verb} {human_bytes(need)} of {where} memory but this machine has "
                         f"{human_bytes(free)} available now ({source})" + (f"; {hint}" if hint else ""))


def writable_folder_problem(folder) -> str | None:
    """Why no file can be made in ``folder`` (it does not exist, is not a folder, is not
    writable), or None. Tried for real with a nameless temporary file, gone at once: a
    permission check alone passes for root where the filesystem still refuses (/proc)."""
    import tempfile

    if not os.path.exists(folder):
        return "does not exist"
    if not os.path.isdir(folder):
        return "is not a directory"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return "is not writable (no file can be created there)"
    return None


def refuse_off_backend(rt, stage: str, flag: str, given: bool, backend: str = "cuda") -> None:
    """Refuse ``flag`` (when ``given``) on a run whose backend is not ``backend``: the stage reads it
    there only, and ignored it would label figures with a choice that was never made."""
    if given and rt.backend != backend:
        name = backend.upper() if backend == "cuda" else backend
        raise ValueError(f"{flag} applies to the {stage} stage on {name} only; this run's backend is {rt.backend}")


def check_context(cfg, backend: str, model: str, total: int, asked: int, parts: str) -> int:
    """Refuse a run whose longest sequence, ``total`` tokens (``parts``: the flags that make it,
    in words), is past the context the runner of ``backend`` gets for ``model`` (``cfg``) when the
    run asks ``nrt.LLM`` for ``asked`` (LLM caps that at the model's context without a word:
    :func:`nexusrt.engine.fit.runner_context`); returns that context."""
    from ..engine.fit import runner_context  # here, not at the top: engine.fit pulls in the model stack

    limit = runner_context(cfg, backend, asked)
    if total > limit:
        raise ValueError(f"{parts} = {total} tokens exceed {model}'s context of {limit} tokens on {backend}; "
                         f"give at most {limit} in all")
    return limit


def prompt_ids(n: int, vocab: int = 256):
    """The benchmarks' prompt: ``n`` int32 ids below ``vocab`` in a fixed, unrepeating-looking order
    (the default 256 keeps them bytes, which every tokenizer and model here takes)."""
    import numpy as np

    return ((np.arange(n, dtype=np.int64) * 7919 + 11) % vocab).astype(np.int32)

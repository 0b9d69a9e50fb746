"""``nexusrt chat``: an interactive multi-turn chat on the terminal.

Each line read is a user turn; the reply streams to stdout and both join the history, so the
model sees the whole conversation (rendered with its chat template) every turn. ``/reset``
forgets the history, ``/exit`` (or end of input) quits; Ctrl-C during a reply stops that
reply, Ctrl-C at the prompt quits. Prompts and notices go to stderr, replies to stdout.

The model's chat template is tried on a one-message conversation before the first prompt: a
model without one (or with one that cannot render a user turn) fails at start, in one line,
rather than at the first reply. An error of one turn (the context outgrown, a template that
refuses that conversation) drops the turn and the chat goes on.
"""

from __future__ import annotations

import sys

from ..errors import ModelError
from .guard import describe
from .prompt import MAX_PROMPT_BYTES
from .streams import require_stdin

HELP = "/reset clears the history, /exit quits"
PROBE = {"role": "user", "content": "hello"}  # the simplest conversation every chat template renders


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _read_line(stream) -> str | None:
    sys.stderr.write("> ")
    sys.stderr.flush()
    raw = stream.readline(MAX_PROMPT_BYTES + 1)  # bounded: stdin may be a file with no newline at all
    if not raw:
        return None
    if len(raw) > MAX_PROMPT_BYTES:  # ends the chat: skipping the rest of the line may never end
        raise ValueError(f"standard input: a line longer than the {MAX_PROMPT_BYTES}-byte prompt limit")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return "\udcff"  # reported by the caller as invalid text; the chat goes on


def check_template(llm, system: str | None) -> None:
    """Raise ModelError naming the model unless its chat template renders a user message (after
    ``system`` when given); a bad ``system`` text fails here too (ValueError, TypeError)."""
    from ..engine.prompts import chat_messages

    messages = chat_messages([PROBE], system)
    try:
        llm.tokenizer.apply_chat_template(messages)
    except ModelError as exc:
        raise ModelError(f"cannot chat with {llm.model.name}: {describe(exc)} (nexusrt chat needs a chat "
                         "template that renders a user message; nexusrt generate --prompt completes plain "
                         "text without one)") from exc


def run_chat(llm, system: str | None, sampling: dict, stdin=None) -> int:
    """The read-reply loop over ``stdin`` (bytes; default the process's); returns the exit status.

    Raises (before the first prompt) when the model's chat template cannot render a conversation.
    """
    if stdin is None:
        require_stdin("nexusrt chat reads each turn from it")
        stdin = sys.stdin.buffer
    check_template(llm, system)
    history: list[dict] = []
    _say(f"nexusrt chat: {llm.model.name} on {llm.backend}; {HELP}")
    while True:
        try:
            line = _read_line(stdin)
        except KeyboardInterrupt:
            _say("")
            return 0
        if line is None:
            _say("")
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history.clear()
            _say("(history cleared)")
            continue
        if not command:
            continue
        if command.startswith("/"):
            _say(f"unknown command {command.split()[0]}; {HELP}")
            continue
        if "\udcff" in line:
            _say("that line is not valid UTF-8 text; try again")
            continue
        history.append({"role": "user", "content": line})
        reply = _reply(llm, history, system, sampling)
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})


def _reply(llm, history, system, sampling) -> str | None:
    """Stream one reply; None when it failed or was interrupted (the turn is dropped)."""
    pieces: list[str] = []
    stream = None
    try:
        # Inside the try: stream_chat checks the messages at once, the template renders at the
        # first next(); either failing is this turn's error, not the session's.
        stream = llm.stream_chat(history, system=system, **sampling)
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        _say("\n[reply interrupted]")
        return None
    except (ValueError, ModelError) as exc:  # e.g. the conversation outgrew the context, or the
        # template refuses this history (raise_exception): a later turn or /reset can still work
        if pieces:
            sys.stdout.write("\n")  # the cut-short reply still ends its line
        _say(f"error: {describe(exc)}; /reset starts over")
        return None
    finally:
        # On every way out, an error that ends the chat too (stdout gone, out of memory): a stream
        # left open, held by the traceback, would make the LLM's close refuse and hide that error.
        if stream is not None:
            stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)

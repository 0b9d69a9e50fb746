"""``nexusrt chat``: an interactive multi-turn chat on the terminal.

Each line read is a user turn; the reply streams to stdout and both join the history, so the
model sees the whole conversation (rendered with its chat template) every turn. ``/reset``
forgets the history, ``/exit`` (or end of input) quits; Ctrl-C during a reply stops that
reply, Ctrl-C at the prompt quits. Prompts and notices go to stderr, replies to stdout.
"""

from __future__ import annotations

import sys

HELP = "/reset clears the history, /exit quits"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _read_line(stream) -> str | None:
    sys.stderr.write("> ")
    sys.stderr.flush()
    raw = stream.readline()
    if not raw:
        return None
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return "\udcff"  # reported by the caller as invalid text; the chat goes on


def run_chat(llm, system: str | None, sampling: dict, stdin=None) -> int:
    """The read-reply loop over ``stdin`` (bytes; default the process's); returns the exit status."""
    stdin = stdin or sys.stdin.buffer
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
    stream = llm.stream_chat(history, system=system, **sampling)
    try:
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        _say("\n[reply interrupted]")
        return None
    except ValueError as exc:  # e.g. the conversation outgrew the context
        _say(f"error: {exc}; /reset starts over")
        return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)

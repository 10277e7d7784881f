"""One round of the demo in a fresh process: resume each session from Redis and feed its next passages.

`ctxmem demo` starts this module (`python -m ctxmem.demo_worker`) once per round and writes a
JSON spec to its stdin (see `ctxmem.demo.Demo.feed`). The worker loads the model and resumes
every session through a `MemoryManager`. For each of the next `turns` passages it sends the
whole conversation plus the passage as a user message, so the session encodes only the new
message and a short reply. It prints one JSON object per line on stdout: {"event": "ready"}
once the model is loaded, then {"event": "turn", "session", "passage", "messages",
"tokens_seen"} after each committed turn. Anything else it prints goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable, TextIO

import torch
from transformers.utils import logging as transformers_logging

from ctxmem.manager import MemoryManager
from ctxmem.model import load_model
from ctxmem.rope_scaling import RopeScaling
from ctxmem.session import Session, SessionSettings

logger = logging.getLogger(__name__)


def feed_session(session: Session, passages: list[str], turns: int, system: str, reply_tokens: int,
                 report: Callable[[dict], None]) -> None:
    """Feed the session's next `turns` passages, each as a user message answered by a reply.

    The next passage follows the user messages already in the session's log, counted from the
    start of `passages` and wrapping around at its end. A new session opens with `system`.
    """
    history = [record["message"] for record in session.records]
    if not history:
        history = [{"role": "system", "content": system}]
    done = sum(1 for message in history if message["role"] == "user")
    for step in range(turns):
        passage = (done + step) % len(passages)
        history.append({"role": "user", "content": passages[passage]})
        reply = session.generate(history, max_new_tokens=reply_tokens)
        history.append(reply.message.as_dict())
        report({"event": "turn", "session": session.session_id, "passage": passage,
                "messages": len(session.records), "tokens_seen": session.saturation().tokens_seen})


def run(spec: dict, events: TextIO) -> None:
    """Load the model named in `spec` and feed every session it lists, reporting to `events`."""
    def report(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    torch.set_num_threads(spec["threads"])
    transformers_logging.disable_progress_bar()
    model, tokenizer = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"],
                                  rope=RopeScaling.model_validate(spec["rope"]))
    manager = MemoryManager(model, tokenizer, spec["redis_url"], prefix=spec["prefix"],
                            settings=SessionSettings.model_validate(spec["settings"]))
    report({"event": "ready"})
    for entry in spec["sessions"]:
        session = manager.session(entry["id"])
        feed_session(session, entry["passages"], spec["turns"], spec["system"], spec["reply_tokens"], report)
        logger.info("fed session %r: %d messages", entry["id"], len(session.records))


def main() -> int:
    spec = json.load(sys.stdin)
    logging.basicConfig(level=spec.get("log_level", logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    events, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the JSON event lines
    run(spec, events)
    return 0


if __name__ == "__main__":
    sys.exit(main())

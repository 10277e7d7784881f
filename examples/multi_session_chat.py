"""Two conversations that outlive their processes: each run adds one turn to each, resumed from Redis.

Run: python examples/multi_session_chat.py            (three runs, each in a fresh Python process)
     python examples/multi_session_chat.py --turn N   (one run: turn N of both conversations)
Offline, on the bundled reference model. Redis from $CTXMEM_REDIS_URL, else ctxmem's embedded
server, whose data outlives the process. A run keeps no history of its own. It reads the stored
conversation with ChatCtxMem.history, appends its question and replies, so only the new message
is encoded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid

from langchain_core.messages import HumanMessage, SystemMessage

from langchain_ctxmem import ChatCtxMem

QUESTIONS = {
    "ada": ["My name is Ada and I live in Oslo.", "What is my name?", "Where do I live?"],
    "marcus": ["My name is Marcus and I live in Lima.", "Where do I live?", "What is my name?"],
}


def one_run(turn: int, run_id: str) -> None:
    """Add turn `turn` to both conversations, each resumed from what earlier processes stored."""
    for person, questions in QUESTIONS.items():
        thread = f"example-{run_id}-{person}"
        model = ChatCtxMem(model="reference", max_tokens=24)
        history = model.history(thread) if turn > 0 else [SystemMessage("You are a helpful assistant.")]
        question = HumanMessage(questions[turn])
        reply = model.invoke([*history, question], config={"configurable": {"thread_id": thread}})
        usage = reply.usage_metadata
        print(f"[turn {turn}] {thread}: {question.content!r} -> {reply.content!r} "
              f"({usage['input_token_details']['cache_read']} of {usage['input_tokens']} prompt tokens from memory)")
        if turn == len(questions) - 1:
            model.delete_session(thread)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turn", type=int, choices=range(3), help="run only this turn (0, 1 or 2) in this process")
    parser.add_argument("--run-id", default=uuid.uuid4().hex[:8], help="names the two sessions")
    args = parser.parse_args()
    if args.turn is not None:
        one_run(args.turn, args.run_id)
        return 0
    try:
        for turn in range(3):
            subprocess.run([sys.executable, __file__, "--turn", str(turn), "--run-id", args.run_id], check=True)
    except subprocess.CalledProcessError:
        for person in QUESTIONS:  # a failed run leaves nothing behind
            ChatCtxMem(model="reference").delete_session(f"example-{args.run_id}-{person}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

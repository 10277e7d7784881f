"""`ctxmem inspect ...` and `ctxmem report`: argparse wiring and rich printing over ctxmem.inspect.

`add_parsers(commands)` adds both commands to the main parser, and `COMMANDS` maps them to their
run functions. With `--json` a command prints the `model_dump(mode="json")` of the API's view
(see ctxmem.inspect.inspector for the keys) as one JSON document. Errors follow ctxmem.cli:
invalid input, an unknown session or landmark, a malformed export line or data of another model
raise ValueError (or a subclass), which main prints on one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctxmem.store.keys import DEFAULT_PREFIX

LANDMARKS_LISTED = 100  # default --limit of `inspect landmarks`


def add_parsers(commands) -> None:
    """Add `inspect` (with its subcommands) and `report` to the main parser's subcommands."""
    inspect = commands.add_parser("inspect", help="show what the memory contains: sessions, landmarks, search, "
                                                  "export and import, delete, plots")
    actions = inspect.add_subparsers(dest="action", required=True)

    sessions = actions.add_parser("sessions", help="list the stored sessions")
    _add_store_options(sessions, json_help="print a JSON list instead of a table")

    session = actions.add_parser("session", help="a session's timeline: turns, evictions, landmark creation")
    session.add_argument("session_id", metavar="ID", help="session id")
    _add_store_options(session)

    landmarks = actions.add_parser("landmarks", help="list a session's landmarks, a page at a time")
    landmarks.add_argument("session_id", metavar="ID", help="session id")
    landmarks.add_argument("--offset", type=int, default=0, help="landmarks to skip first (default 0)")
    landmarks.add_argument("--limit", type=int, default=LANDMARKS_LISTED,
                           help=f"landmarks to list (default {LANDMARKS_LISTED}; 0 lists all)")
    _add_store_options(landmarks)

    landmark = actions.add_parser("landmark", help="one landmark: its full record and per-layer tensor statistics")
    landmark.add_argument("session_id", metavar="ID", help="session id")
    landmark.add_argument("index", metavar="N", type=int, help="landmark index")
    _add_store_options(landmark)

    _add_search_parser(actions)
    _add_transfer_parsers(actions)

    plot = actions.add_parser("plot", help="draw saturation, evictions, landmark creation and attention to a PNG")
    plot.add_argument("session_id", metavar="ID", help="session id")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    _add_store_options(plot, json_output=False)

    report = commands.add_parser("report", help="write a session's tables and plots to one self-contained HTML file")
    report.add_argument("session_id", metavar="ID", help="session id")
    report.add_argument("-o", "--output", required=True, help="HTML file to write")
    _add_store_options(report, json_output=False)


def _add_search_parser(actions) -> None:
    search = actions.add_parser("search", help="find landmarks by their source text or by key match")
    search.add_argument("session_id", metavar="ID", help="session id")
    search.add_argument("text", metavar="TEXT", help="text to look for")
    search.add_argument("--by", choices=["text", "keys"], default="text",
                        help="text: source text containing TEXT (case-insensitive); keys: landmarks whose mean "
                             "keys best match the model's encoding of TEXT (loads --model)")
    search.add_argument("--limit", type=int, default=10, help="hits to show at most (default 10)")
    _add_model_options(search, default="reference")
    _add_store_options(search)


def _add_transfer_parsers(actions) -> None:
    export = actions.add_parser("export", help="write a session, tensors included, to a JSON Lines file")
    export.add_argument("session_id", metavar="ID", help="session id")
    export.add_argument("-o", "--output", required=True, help="JSON Lines file to write (*.jsonl)")
    _add_store_options(export)

    load = actions.add_parser("import", help="store a session from a file that `inspect export` wrote")
    load.add_argument("path", metavar="FILE", help="JSON Lines file")
    _add_model_options(load, default=None,
                       help_text="check that this model ('reference', a folder or a hub id) computed the data")
    _add_store_options(load)

    delete = actions.add_parser("delete", help="delete a session, or one landmark of a `ctxmem run` session")
    delete.add_argument("session_id", metavar="ID", help="session id")
    delete.add_argument("--landmark", type=int, metavar="N", help="delete only landmark N (and its chunk)")
    delete.add_argument("--yes", action="store_true", help="delete without asking for confirmation")
    _add_store_options(delete, json_output=False)


def _add_store_options(parser: argparse.ArgumentParser, json_output: bool = True,
                       json_help: str = "print JSON instead of a table") -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    parser.add_argument("--redis", dest="redis_url",
                        help="Redis URL (default: $CTXMEM_REDIS_URL, else the embedded server)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="first part of every Redis key (default: ctxmem)")
    if json_output:
        parser.add_argument("--json", action="store_true", help=json_help)


def _add_model_options(parser: argparse.ArgumentParser, default: str | None,
                       help_text: str = "model for --by keys: 'reference', a local folder or a hub id") -> None:
    parser.add_argument("--model", default=default, help=help_text)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def _inspector(args: argparse.Namespace):
    from ctxmem.inspect import Inspector
    from ctxmem.store.connection import connect
    from ctxmem.store.keys import validate_prefix

    validate_prefix(args.prefix)
    return Inspector(connect(args.redis_url), prefix=args.prefix)


def _load_model(args: argparse.Namespace):
    from transformers.utils import logging as transformers_logging

    from ctxmem.model import load_model

    transformers_logging.disable_progress_bar()
    return load_model(args.model, device=args.device, dtype=args.dtype)


def _print_json(console: Console, data: object) -> None:
    """Print `data` as indented JSON, unstyled, which stays fast for thousands of rows."""
    console.file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _table(console: Console, title: str, headers: list[str], rows: list[list[str]],
           text_column: int | None = None) -> Table:
    """Build a table whose columns are as wide as their longest value or header word, so values never wrap.

    The `text_column` takes the width that the console leaves (at least 10 characters) and ends
    its cells with an ellipsis.
    """
    widths = [max([len(word) for word in header.split()] + [len(row[position]) for row in rows])
              for position, header in enumerate(headers)]
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for position, header in enumerate(headers):
        if position == text_column:
            others = sum(width for column, width in enumerate(widths) if column != text_column)
            width = max(10, min(widths[position], console.width - others - 2 * (len(headers) - 1)))
            table.add_column(header, width=width, no_wrap=True, overflow="ellipsis")
        else:
            table.add_column(header, justify="left" if position == 0 else "right", width=widths[position])
    for row in rows:
        table.add_row(*row)
    return table


def _time(iso: str | None) -> str:
    """Return an ISO 8601 time as "YYYY-MM-DD HH:MM:SS"."""
    return "-" if iso is None else iso[:19].replace("T", " ")


def _number(value: float | int | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


# Listings


def run_sessions(args: argparse.Namespace, console: Console) -> None:
    inspector = _inspector(args)
    summaries = inspector.sessions()
    if args.json:
        _print_json(console, [summary.model_dump(mode="json") for summary in summaries])
        return
    if not summaries:
        console.print(f"no sessions under prefix {args.prefix!r}")
        return
    rows = [[summary.session, str(summary.messages), _number(summary.tokens_seen), str(summary.landmarks),
             _saturation(summary), _time(summary.updated)[:16]] for summary in summaries]
    console.print(_table(console, f"sessions under prefix {args.prefix!r}",
                         ["session", "messages", "tokens seen", "landmarks", "saturation", "updated (UTC)"],
                         rows))


def _saturation(summary) -> str:
    if summary.saturation is None:
        return "-"
    return f"{summary.entries_used}/{summary.budget} {summary.saturation:.0%}"


def run_session(args: argparse.Namespace, console: Console) -> None:
    timeline = _inspector(args).timeline(args.session_id)
    if args.json:
        _print_json(console, timeline.model_dump(mode="json"))
        return
    console.print(f"session {timeline.session!r} ({timeline.kind}): {timeline.messages} messages, "
                  f"{len(timeline.turns)} turns, {len(timeline.landmarks)} landmarks", soft_wrap=True)
    if timeline.turns:
        rows = [[str(turn.turn), _time(turn.time)[5:], str(turn.tokens_seen),
                 f"{turn.entries_used}/{turn.budget} {turn.saturation:.0%}", str(turn.evictions),
                 str(turn.evicted_tokens), str(turn.landmarks_created)] for turn in timeline.turns]
        console.print(_table(console, "turns", ["turn", "committed (UTC)", "tokens seen", "saturation", "evictions",
                                                "evicted tokens", "new landmarks"], rows))
    elif timeline.landmarks:
        first, last = timeline.landmarks[0], timeline.landmarks[-1]
        console.print(f"no committed turns (landmarks written by `ctxmem run`): landmark {first.index} created "
                      f"{_time(first.created)}, landmark {last.index} created {_time(last.created)}, over tokens "
                      f"{first.token_start}-{last.token_end}", soft_wrap=True)


def run_landmarks(args: argparse.Namespace, console: Console) -> None:
    if args.limit < 0 or args.offset < 0:
        raise ValueError(f"invalid --offset {args.offset} or --limit {args.limit}: use 0 or more "
                         "(--limit 0 lists all)")
    page = _inspector(args).landmarks(args.session_id, offset=args.offset, limit=args.limit or None)
    if args.json:
        _print_json(console, page.model_dump(mode="json"))
        return
    rows = [[str(row.index), f"{row.token_start}-{row.token_end}", _time(row.created)[:16], str(row.bytes),
             f"{row.key_norm:.2f}", str(row.injected), f"{row.attention_mass:.3f}", row.preview]
            for row in page.landmarks]
    shown = f"{page.offset}-{page.offset + len(rows) - 1}" if rows else "none"
    title = f"landmarks {shown} of {page.total} in session {page.session!r}"
    if page.offset + len(rows) < page.total:
        title += " (--offset and --limit for more)"
    console.print(_table(console, title, ["index", "tokens", "created (UTC)", "bytes", "key norm", "injected",
                                 "attention", "source text"], rows, text_column=7))


def run_landmark(args: argparse.Namespace, console: Console) -> None:
    detail = _inspector(args).landmark(args.session_id, args.index)
    if args.json:
        _print_json(console, detail.model_dump(mode="json"))
        return
    record = detail.record
    # The record's own injected and attention_mass stay 0; the counts below come from the usage hash.
    shown = [name for name in record if name not in ("text", "fingerprint", "injected", "attention_mass")]
    fields = [[name, str(record[name])] for name in shown]
    fields += [["bytes", str(detail.bytes)], ["injected", str(detail.injected)],
               ["attention_mass", f"{detail.attention_mass:.4f}"], ["chunk_stored", str(detail.chunk_stored)],
               ["model", f"{record['fingerprint']['architecture']} weights {record['fingerprint']['weights_hash'][:16]}"]]
    console.print(_table(console, f"landmark {record['index']} of session {detail.session!r}", ["field", "value"], fields))
    console.print("source text:", style="bold")
    console.print(record["text"], markup=False, highlight=False)
    rows = [[str(layer.layer), f"{layer.key_norm:.3f}", f"{layer.key_mean:.3f}", f"{layer.key_std:.3f}",
             f"{layer.key_min:.3f}..{layer.key_max:.3f}", f"{layer.value_norm:.3f}", f"{layer.value_mean:.3f}",
             f"{layer.value_std:.3f}", f"{layer.value_min:.3f}..{layer.value_max:.3f}"] for layer in detail.layers]
    console.print(_table(console, "per-layer statistics (keys without RoPE)",
                         ["layer", "key norm", "key mean", "key std", "key range", "value norm", "value mean",
                          "value std", "value range"], rows))


def run_search(args: argparse.Namespace, console: Console) -> None:
    if args.limit < 1:
        raise ValueError(f"invalid --limit {args.limit}; use 1 or more")
    inspector = _inspector(args)
    if args.by == "text":
        hits = inspector.search_text(args.session_id, args.text, limit=args.limit)
    else:
        from ctxmem.inspect.search import search_keys

        inspector.require_session(args.session_id)
        model, tokenizer = _load_model(args)
        hits = search_keys(inspector, args.session_id, args.text, model, tokenizer, limit=args.limit)
    if args.json:
        _print_json(console, {"session": args.session_id, "query": args.text, "by": args.by, "hits": hits})
        return
    if not hits:
        console.print(f"no landmark of session {args.session_id!r} matches {args.text!r} by {args.by}")
        return
    score = "occurrences" if args.by == "text" else "cosine"
    rows = [[str(hit["index"]), f"{hit['token_start']}-{hit['token_end']}", f"{hit['score']:.3f}", hit["preview"]]
            for hit in hits]
    console.print(_table(console, f"landmarks of session {args.session_id!r} matching {args.text!r} by {args.by}",
                         ["index", "tokens", score, "source text"], rows, text_column=3))


# Export, import and delete


def run_export(args: argparse.Namespace, console: Console) -> None:
    from pathlib import Path

    from ctxmem.inspect.transfer import export_session

    inspector = _inspector(args)
    inspector.require_session(args.session_id)
    path = Path(args.output)
    if path.is_dir():
        raise ValueError(f"{args.output!r} is a folder; pass the path of the .jsonl file to write")
    # The file gets its name only when complete, so a failed export leaves no half-written file.
    temporary = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with temporary.open("w", encoding="utf-8") as out:
            counts = export_session(inspector, args.session_id, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    temporary.replace(path)
    if args.json:
        _print_json(console, {"session": args.session_id, "path": str(path), **counts})
        return
    console.print(f"exported session {args.session_id!r} to {path}: {counts['messages']} messages, "
                  f"{counts['landmarks']} landmarks, {counts['chunks']} chunks"
                  f"{', the state' if counts['state'] else ''}", soft_wrap=True)


def run_import(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.inspect.transfer import check_model, import_session, read_export

    export = read_export(args.path)
    if args.model is not None:
        from ctxmem.fingerprint import model_fingerprint

        model, _ = _load_model(args)
        check_model(export, model_fingerprint(model))
    written = import_session(_inspector(args), export)
    if args.json:
        _print_json(console, written)
        return
    console.print(f"imported session {written['session']!r} under prefix {args.prefix!r}: "
                  f"{written['messages']} messages, {written['landmarks']} landmarks, {written['chunks']} chunks"
                  f"{', the state' if written['state'] else ''}", soft_wrap=True)


def run_delete(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.cli import CommandError

    inspector = _inspector(args)
    session_id = inspector.require_session(args.session_id)
    target = f"session {session_id!r}" if args.landmark is None else f"landmark {args.landmark} of session {session_id!r}"
    if args.landmark is not None:
        inspector.landmark(session_id, args.landmark)  # an unknown landmark fails before the question
    if not args.yes and not _confirmed(console, f"delete {target} under prefix {args.prefix!r}? [y/N] "):
        raise CommandError(f"nothing deleted: {target} is kept (pass --yes to delete without asking)")
    removed = inspector.delete(session_id, args.landmark)
    console.print(f"deleted {target} ({removed} Redis {'key' if removed == 1 else 'keys'})")


def _confirmed(console: Console, question: str) -> bool:
    """Ask `question` on the terminal, or read the reply from a piped stdin. Only y or yes confirms."""
    try:
        answer = console.input(escape(question)) if sys.stdin.isatty() else _piped_answer(console, question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _piped_answer(console: Console, question: str) -> str:
    console.print(question, end="", markup=False, highlight=False)
    line = sys.stdin.readline()
    console.print(line.rstrip("\n"), markup=False, highlight=False)
    return line


# Plots and the report


def run_plot(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.inspect.plots import plot_session

    path = plot_session(_inspector(args), args.session_id, args.output)
    console.print(f"wrote the plots of session {args.session_id!r} to {path}", soft_wrap=True)


def run_report(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.inspect.report import write_report

    path = write_report(_inspector(args), args.session_id, args.output)
    console.print(f"wrote the report of session {args.session_id!r} to {path}", soft_wrap=True)


ACTIONS: dict[str, Callable[[argparse.Namespace, Console], None]] = {
    "sessions": run_sessions,
    "session": run_session,
    "landmarks": run_landmarks,
    "landmark": run_landmark,
    "search": run_search,
    "export": run_export,
    "import": run_import,
    "delete": run_delete,
    "plot": run_plot,
}


def run_inspect(args: argparse.Namespace, console: Console) -> None:
    ACTIONS[args.action](args, console)


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], None]] = {
    "inspect": run_inspect,
    "report": run_report,
}

"""`ctxmem inspect ...` and `ctxmem report` as a user runs them: JSON keys, files, errors and exit codes.

Most commands run in this process through `ctxmem.cli.main`, the function that the console
script calls, so that each test saves the start of a new interpreter. One test runs the installed script.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from PIL import Image

from ctxmem.cli import main
from ctxmem.inspect import LandmarkRow, SessionSummary, Timeline, TurnRow
from tests.conftest import REDIS_URL
from tests.inspect_data import feed_conversation, session_snapshot, write_landmarks

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def store(redis_client) -> list[str]:
    """A 12-landmark `ctxmem run`-like session "reading"; returns the --redis and --prefix options."""
    client, prefix = redis_client
    write_landmarks(client, prefix, "reading", 12)
    return ["--redis", REDIS_URL, "--prefix", prefix]


@pytest.fixture
def conversation(reference, redis_client, store) -> list[str]:
    """Adds a conversation "talk" with attention statistics to `store`."""
    client, prefix = redis_client
    feed_conversation(*reference, client, prefix, "talk", turns=3)
    return store


def ctxmem(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_of(capsys, *args: str):
    code, out, err = ctxmem(capsys, *args)
    assert code == 0, err
    return json.loads(out)


def test_sessions_json_keys(conversation, capsys):
    sessions = json_of(capsys, "inspect", "sessions", *conversation, "--json")
    assert [row["session"] for row in sessions] == ["reading", "talk"]
    assert all(set(row) == set(SessionSummary.model_fields) for row in sessions)
    assert set(SessionSummary.model_fields) == {"session", "kind", "messages", "turns", "tokens_seen", "landmarks",
                                                "chunks", "saturation", "entries_used", "budget", "updated"}
    code, out, _ = ctxmem(capsys, "inspect", "sessions", *conversation)
    assert code == 0
    assert "talk" in out
    assert "reading" in out


def test_session_timeline_json(conversation, capsys):
    timeline = json_of(capsys, "inspect", "session", "talk", *conversation, "--json")
    assert set(timeline) == set(Timeline.model_fields) == {"session", "kind", "messages", "turns", "landmarks"}
    assert [turn["turn"] for turn in timeline["turns"]] == [0, 1, 2]
    assert set(timeline["turns"][0]) == set(TurnRow.model_fields)
    assert sum(turn["landmarks_created"] for turn in timeline["turns"]) == len(timeline["landmarks"])
    code, out, _ = ctxmem(capsys, "inspect", "session", "reading", *conversation)
    assert code == 0
    assert "no committed turns" in out


def test_landmarks_json_pages(store, capsys):
    page = json_of(capsys, "inspect", "landmarks", "reading", *store, "--offset", "10", "--json")
    assert set(page) == {"session", "total", "offset", "landmarks"}
    assert page["total"] == 12
    assert [row["index"] for row in page["landmarks"]] == [10, 11]
    assert set(page["landmarks"][0]) == set(LandmarkRow.model_fields) == {
        "index", "token_start", "token_end", "preview", "text", "created", "dtype", "compression", "bytes",
        "key_norm", "injected", "attention_mass"}
    everything = json_of(capsys, "inspect", "landmarks", "reading", *store, "--limit", "0", "--json")
    assert len(everything["landmarks"]) == 12
    code, out, _ = ctxmem(capsys, "inspect", "landmarks", "reading", *store, "--limit", "3")
    assert code == 0
    assert "landmarks 0-2 of 12" in out


def test_landmark_detail_json(conversation, capsys):
    detail = json_of(capsys, "inspect", "landmark", "talk", "0", *conversation, "--json")
    assert set(detail) == {"session", "record", "bytes", "injected", "attention_mass", "chunk_stored", "layers"}
    assert detail["record"]["index"] == 0
    assert detail["injected"] >= 1  # placed by the eviction that created it
    assert [layer["layer"] for layer in detail["layers"]] == [0, 1]
    code, out, _ = ctxmem(capsys, "inspect", "landmark", "talk", "0", *conversation)
    assert code == 0
    assert "per-layer statistics" in out


def test_search_by_text_and_keys(conversation, capsys):
    found = json_of(capsys, "inspect", "search", "reading", "NUMBER 7", *conversation, "--json")
    assert [hit["index"] for hit in found["hits"]] == [7]
    by_keys = json_of(capsys, "inspect", "search", "talk", "BERNARDO", "--by", "keys", "--limit", "3",
                      *conversation, "--json")
    assert len(by_keys["hits"]) == 3
    assert set(by_keys["hits"][0]) == {"index", "token_start", "token_end", "preview", "score"}


def test_export_delete_import_round_trip(store, redis_client, tmp_path, capsys, monkeypatch):
    client, prefix = redis_client
    before = session_snapshot(client, prefix, "reading")
    path = tmp_path / "reading.jsonl"
    exported = json_of(capsys, "inspect", "export", "reading", "-o", str(path), *store, "--json")
    assert exported["landmarks"] == 12

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, _, err = ctxmem(capsys, "inspect", "delete", "reading", *store)
    assert code == 1
    assert "nothing deleted" in err
    assert session_snapshot(client, prefix, "reading") == before

    code, out, err = ctxmem(capsys, "inspect", "delete", "reading", "--yes", *store)
    assert code == 0, err
    assert session_snapshot(client, prefix, "reading") == {}
    imported = json_of(capsys, "inspect", "import", str(path), *store, "--json")
    assert imported["landmarks"] == 12
    assert session_snapshot(client, prefix, "reading") == before


def test_delete_one_landmark_after_yes(store, redis_client, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    code, out, err = ctxmem(capsys, "inspect", "delete", "reading", "--landmark", "4", *store)
    assert code == 0, err
    page = json_of(capsys, "inspect", "landmarks", "reading", *store, "--json")
    assert 4 not in [row["index"] for row in page["landmarks"]]
    assert page["total"] == 11


def pixels(path: Path) -> numpy.ndarray:
    return numpy.asarray(Image.open(path).convert("L"), dtype=numpy.float64)


def test_plot_png_is_drawn(conversation, tmp_path, capsys):
    path = tmp_path / "talk.png"
    code, _, err = ctxmem(capsys, "inspect", "plot", "talk", "-o", str(path), *conversation)
    assert code == 0, err
    assert path.stat().st_size > 20_000
    image = pixels(path)
    assert image.shape == (750, 1100)  # 11 x 7.5 inches at 100 dpi
    assert image.std() > 20  # lines and text on white, not a blank page
    assert (image < 128).mean() > 0.01


def test_report_renders_in_chromium(conversation, tmp_path, capsys):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing, and this test opens the report in it: install it with "
                    "`apt-get install -y chromium` (.ci/run does)")
    report = tmp_path / "talk.html"
    code, _, err = ctxmem(capsys, "report", "talk", "-o", str(report), *conversation)
    assert code == 0, err
    html = report.read_text(encoding="utf-8")
    assert "data:image/png;base64," in html
    for reference in ("http://", "https://", "src=\"//", "<link", "<script"):
        assert reference not in html
    assert "<h2>Turns</h2>" in html
    assert "BERNARDO" in html

    screenshot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={screenshot}", "--window-size=1200,1600", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = pixels(screenshot)
    assert image.shape == (1600, 1200)
    assert image.std() > 20
    assert (image < 128).mean() > 0.01  # text and plot lines were drawn


def export_with_other_model(tmp_path: Path, capsys, store: list[str]) -> Path:
    path = tmp_path / "reading.jsonl"
    json_of(capsys, "inspect", "export", "reading", "-o", str(path), *store, "--json")
    return path


@pytest.mark.parametrize("args, message", [
    (["inspect", "session", "ghost"], "session 'ghost' not found under prefix"),
    (["inspect", "landmarks", "ghost"], "session 'ghost' not found under prefix"),
    (["inspect", "landmark", "reading", "99"], "session 'reading' has no landmark 99"),
    (["inspect", "delete", "reading", "--landmark", "99", "--yes"], "session 'reading' has no landmark 99"),
    (["inspect", "export", "ghost", "-o", "{tmp}/x.jsonl"], "session 'ghost' not found"),
    (["inspect", "plot", "reading", "-o", "{tmp}/x.jpg"], "invalid plot file"),
    (["report", "ghost", "-o", "{tmp}/x.html"], "session 'ghost' not found"),
    (["inspect", "landmarks", "reading", "--limit", "-1"], "invalid --offset 0 or --limit -1"),
    (["inspect", "sessions", "--prefix", "has space"], "invalid key prefix 'has space'"),
    (["inspect", "search", "reading", "x", "--limit", "0"], "invalid --limit 0"),
    (["inspect", "import", "{tmp}/missing.jsonl"], "export file '{tmp}/missing.jsonl' not found"),
    (["inspect", "import", "{bad_line}"], "line 2 of '{bad_line}' is not valid JSON"),
    (["inspect", "import", "{export}", "--model", "reference"], "session 'reading' in the file was computed by "
                                                                 "another model (config_hash"),
])
def test_bad_input_one_line_exit_2(store, tmp_path, capsys, args, message):
    export = export_with_other_model(tmp_path, capsys, store)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(export.read_text().splitlines()[0] + "\n{\"kind\": \"meta\", \n")
    names = {"{tmp}": str(tmp_path), "{bad_line}": str(bad_line), "{export}": str(export)}

    def fill(text: str) -> str:
        for name, value in names.items():
            text = text.replace(name, value)
        return text

    extra = [] if "--prefix" in args else store
    code, _, err = ctxmem(capsys, *[fill(arg) for arg in args], *extra)
    assert code == 2
    assert fill(message) in err
    assert len(err.strip().splitlines()) == 1


def test_console_script_lists_sessions(store):
    script = shutil.which("ctxmem", path=str(Path(sys.executable).parent))
    result = subprocess.run([script, "inspect", "sessions", *store, "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert [row["session"] for row in json.loads(result.stdout)] == ["reading"]

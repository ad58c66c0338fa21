"""The session store's rules on SQLite (the Redis test runs the same contract): idempotent turns, 409s,
tombstones, bounds; and no lost or duplicated turn when the process holding the store is SIGKILLed mid-append."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mer_ray.serve.config import SessionConfig
from mer_ray.serve.session_stores import SqliteStore, open_store
from mer_ray.serve.sessions import SessionConflict, default_dir, request_key

REPO = Path(__file__).resolve().parents[3]


def rec(i: int) -> dict:
    return {"speaker": "A" if i % 2 else "B", "text": f"turn {i}", "text_embedding": [i / 3, 0.1]}


def check_contract(make) -> None:
    """Every rule of :mod:`mer_ray.serve.sessions`; ``make(**limits)`` opens a fresh store."""
    s = make(max_turns=3)
    keys = [request_key({"utterance": rec(i), "expected_turn": i}) for i in range(5)]
    assert s.append("a", None, 0, keys[0]) is None  # a check only: nothing stored
    assert s.get("a") is None
    for i in range(2):
        turn, kept, answer = s.append("a", rec(i), i, keys[i])
        assert (turn, answer) == (i, None) and kept[-1]["text"] == f"turn {i}" and len(kept) == i + 1
    assert kept[0]["text_embedding"] == [0.0, 0.1]  # floats round-trip exactly
    # a retried turn 1 (same key) is the stored turn, not a third one; once answered, the retry gets that answer
    turn, kept, answer = s.append("a", rec(1), 1, keys[1])
    assert (turn, answer, len(kept)) == (1, None, 2) and s.get("a")["n_turns"] == 2
    assert s.annotate("a", 1, {"turn": 1, "label": "joy"}, {"turn": 1, "answer": "stored"})
    assert s.append("a", None, 1, keys[1]) == (1, kept[:1] + [{**rec(1), "prediction": {"turn": 1, "label": "joy"}}],
                                               {"turn": 1, "answer": "stored"})
    for bad, want in [(5, 2), (0, 2)]:  # ahead of the session; turn 0 with another request's key
        with pytest.raises(SessionConflict) as e:
            s.append("a", rec(9), bad, keys[4])
        assert e.value.next_turn == want
    for i in range(2, 5):  # no expected_turn: appended as is
        assert s.append("a", rec(i))[0] == i
    assert [t["text"] for t in s.get("a")["turns"]] == ["turn 2", "turn 3", "turn 4"]  # max_turns
    with pytest.raises(SessionConflict, match="no longer kept"):
        s.append("a", rec(0), 0, keys[0])
    # DELETE closes a session: a tombstone, never restarted at turn 0
    assert s.delete("a") and not s.delete("a") and s.get("a") is None
    for expected in (None, 0, 5):
        with pytest.raises(SessionConflict, match="closed") as e:
            s.append("a", rec(5), expected, keys[0])
        assert e.value.next_turn == 5
    assert s.append("a-2", rec(0), 0, keys[0])[0] == 0  # a fresh id starts at turn 0
    # expiry after ttl_s idle, then the tombstone; the least recently used go first over max_sessions
    s = make(ttl_s=0.5, max_sessions=2)
    s.append("old", rec(0))
    time.sleep(0.7)
    s.append("new", rec(0))
    with pytest.raises(SessionConflict, match="after 1 turns"):
        s.append("old", rec(1), 1)
    s.append("new2", rec(0))
    s.append("new3", rec(0))
    assert s.count() == 2 and s.get("new") is None
    with pytest.raises(SessionConflict):
        s.append("new", rec(1))


def check_adapter_contract(make) -> None:
    """A session keeps the adapter of its first turn (None: the ensemble); a turn asking for another is refused
    before anything is written, and a check-only append refuses it too."""
    from mer_ray.serve.sessions import AdapterConflict

    s = make()
    assert s.append("tv", rec(0), 0, "k0", "tv")[0] == 0 and s.adapter("tv") == "tv" and s.get("tv")["adapter"] == "tv"
    assert s.append("tv", rec(1), 1, "k1", "tv")[0] == 1
    for asked in ("calls", None):
        for record in (None, rec(2)):
            with pytest.raises(AdapterConflict, match="session 'tv' is answered by adapter 'tv'"):
                s.append("tv", record, 2, "k2", asked)
    assert s.get("tv")["n_turns"] == 2  # nothing written
    assert s.append("ens", rec(0))[0] == 0 and s.adapter("ens") is None and s.get("ens")["adapter"] is None
    with pytest.raises(AdapterConflict, match=r"answered by the ensemble \(no adapter\).*asks for adapter 'tv'"):
        s.append("ens", rec(1), None, None, "tv")
    assert s.adapter("never") is None
    s.delete("tv")
    assert s.adapter("tv") is None  # closed: its turns get 409 (the tombstone), not this session's adapter


def test_sqlite_store_contract(tmp_path):
    n = iter(range(100))
    check_contract(lambda **kw: SqliteStore(tmp_path / f"s{next(n)}", **kw))
    check_adapter_contract(lambda **kw: SqliteStore(tmp_path / f"s{next(n)}", **kw))


def test_a_sessions_db_from_before_adapters_opens_and_its_sessions_are_the_ensembles(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "sessions.db")
    old.executescript("CREATE TABLE sessions (sid TEXT PRIMARY KEY, n INTEGER NOT NULL, touched REAL NOT NULL, closed REAL);"
                      "CREATE TABLE turns (sid TEXT NOT NULL, turn INTEGER NOT NULL, key TEXT, record TEXT NOT NULL,"
                      " prediction TEXT, answer TEXT, PRIMARY KEY (sid, turn));"
                      f"INSERT INTO sessions VALUES ('a', 1, {time.time()}, NULL);"
                      "INSERT INTO turns (sid, turn, key, record) VALUES ('a', 0, 'k0', '{\"speaker\": \"A\", \"text\": \"t\"}');")
    old.close()
    s = SqliteStore(tmp_path)
    assert s.adapter("a") is None and s.append("a", rec(1), 1, "k1")[0] == 1
    assert s.append("b", rec(0), 0, "k", "tv")[0] == 0 and s.adapter("b") == "tv"


def test_open_store_defaults_beside_the_models_and_redis_needs_a_url(tmp_path):
    store = open_store(SessionConfig(), tmp_path / "run" / "models")
    assert store.path == tmp_path / "run" / "sessions" / "sessions.db" == default_dir(tmp_path / "run" / "models") / "sessions.db"
    assert open_store(SessionConfig(dir=str(tmp_path / "x")), "m").path == tmp_path / "x" / "sessions.db"
    with pytest.raises(ValueError, match="redis_url"):
        SessionConfig(backend="redis")
    with pytest.raises(ValueError, match="extra"):
        SessionConfig(persist_dir="x")


_WRITER = """
import os, signal, sys
from mer_ray.serve.session_stores import SqliteStore
from tests.unit.serve.test_sessions import rec
s = SqliteStore(sys.argv[1])
mode = sys.argv[2]
for i in range(10**6):
    turn, _, _ = s.append("sid", rec(i), i, str(i))
    if mode == "die-after-write" and i == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # committed, never answered
    print(turn, flush=True)  # the reply
"""


def _writer(db: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(db), mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _retry_and_check(db: Path, acked: int) -> dict:
    """The client retries the first unanswered turn with expected_turn, then goes on; each turn is stored once."""
    s = SqliteStore(db)
    n_before = s.get("sid")["n_turns"]
    assert n_before in (acked + 1, acked + 2)  # the kill fell before or after the unanswered turn's commit
    turn, _, _ = s.append("sid", rec(acked + 1), acked + 1, str(acked + 1))
    assert turn == acked + 1
    assert s.append("sid", rec(acked + 2), acked + 2, str(acked + 2))[0] == acked + 2
    texts = [t["text"] for t in s.get("sid")["turns"]]
    assert texts == [f"turn {i}" for i in range(acked + 3)][-64:]  # none lost, none twice
    return {"acked": acked, "n_at_kill": n_before, "replayed": n_before == acked + 2}


def test_sigkill_between_the_write_and_the_reply_loses_and_duplicates_nothing(tmp_path):
    p = _writer(tmp_path, "die-after-write")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL and out.split() == ["0", "1", "2"]
    assert _retry_and_check(tmp_path, acked=2)["replayed"]  # turn 3 was written: the retry got it back


def test_sigkill_at_any_instant_of_appends_loses_and_duplicates_nothing(tmp_path):
    p = _writer(tmp_path, "loop")
    acked = -1
    try:
        for line in p.stdout:  # bounded: killed after 200 answers
            acked = int(line)
            if acked == 200:
                p.send_signal(signal.SIGKILL)
                break
    finally:
        p.kill()
        p.wait(timeout=30)
    rest = p.stdout.read().split()
    acked = int(rest[-1]) if rest else acked  # replies already in the pipe
    _retry_and_check(tmp_path, acked)


def test_two_processes_append_to_one_sqlite_file(tmp_path):
    """Two Ingress replicas of one node: WAL plus busy_timeout, no lost update."""
    code = ("import sys\nfrom mer_ray.serve.session_stores import SqliteStore\ns = SqliteStore(sys.argv[1], max_turns=100)\n"
            "for i in range(40): s.append('shared', {'speaker': sys.argv[2], 'text': str(i)})")
    ps = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), w], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
          for w in "AB"]
    assert [p.wait(timeout=120) for p in ps] == [0, 0]
    turns = SqliteStore(tmp_path, max_turns=100).get("shared")
    assert turns["n_turns"] == 80 and sorted((t["speaker"], int(t["text"])) for t in turns["turns"]) == [(w, i) for w in "AB" for i in range(40)]

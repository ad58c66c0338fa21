"""The two session stores behind one interface (the rules are in :mod:`mer_ray.serve.sessions`).

``append(sid, record, expected_turn, key, adapter)`` returns ``(turn, kept, answer)``: the
turn's number, the kept turns up to it (oldest first, each with its ``prediction``
when it has one) and the stored answer of a replayed turn (None for a new turn, or
a replayed turn whose answer was never stored). ``record=None`` only checks: it
returns None where an append would happen, so a retry is answered before any
work. ``adapter`` is the adapter answering the turn (None: the ensemble): the first
turn stores it with the session, and a later turn with another raises
:class:`~mer_ray.serve.sessions.AdapterConflict` before anything is written.
``adapter(sid)`` reads an open session's adapter (None for the ensemble or no open
session), and ``get(sid)`` includes it. Both stores are safe to call from several
threads and processes at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from mer_ray.serve.sessions import check_adapter, decide, default_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (sid TEXT PRIMARY KEY, n INTEGER NOT NULL, touched REAL NOT NULL, closed REAL, adapter TEXT);
CREATE INDEX IF NOT EXISTS sessions_touched ON sessions (closed, touched);
CREATE TABLE IF NOT EXISTS turns (sid TEXT NOT NULL, turn INTEGER NOT NULL, key TEXT, record TEXT NOT NULL,
                                  prediction TEXT, answer TEXT, PRIMARY KEY (sid, turn));
"""


def _kept(rows) -> list[dict]:
    return [{**json.loads(rec), **({"prediction": json.loads(p)} if p else {})} for rec, p in rows]


class SqliteStore:
    """Sessions in ``<dir>/sessions.db``: WAL, ``synchronous=FULL``, one ``BEGIN IMMEDIATE`` transaction per write."""

    def __init__(self, dir: str | Path, ttl_s: float = 3600.0, max_sessions: int = 10000, max_turns: int = 64,
                 busy_timeout_s: float = 10.0):
        self.path = Path(dir) / "sessions.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s, self.max_sessions, self.max_turns, self.busy_timeout_s = ttl_s, max_sessions, max_turns, busy_timeout_s
        self._local = threading.local()  # a connection per thread (the Ingress calls from a thread pool)
        with self._tx() as db:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            # a sessions.db written before adapters existed: its sessions are the ensemble's (NULL)
            if "adapter" not in {r[1] for r in db.execute("PRAGMA table_info(sessions)")}:
                db.execute("ALTER TABLE sessions ADD COLUMN adapter TEXT")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed turn survives a power cut too, not only a process kill
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")  # take the write lock first: no upgrade deadlock between replicas
            return self.db

        def __exit__(self, kind, *_):
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _tx(self):
        return self._Tx(self._db())

    def _expire(self, db, now: float) -> None:
        """Close idle sessions and the least recently used over ``max_sessions``; forget old tombstones."""
        idle = [r[0] for r in db.execute("SELECT sid FROM sessions WHERE closed IS NULL AND touched < ?", (now - self.ttl_s,))]
        over = db.execute("SELECT COUNT(*) FROM sessions WHERE closed IS NULL").fetchone()[0] - len(idle) - self.max_sessions
        if over > 0:
            idle += [r[0] for r in db.execute("SELECT sid FROM sessions WHERE closed IS NULL AND touched >= ? ORDER BY touched "
                                              "LIMIT ?", (now - self.ttl_s, over))]
        for sid in idle:
            self._close(db, sid, now)
        db.execute("DELETE FROM sessions WHERE closed IS NOT NULL AND closed < ?", (now - self.ttl_s,))

    @staticmethod
    def _close(db, sid: str, now: float) -> None:
        db.execute("UPDATE sessions SET closed = ? WHERE sid = ?", (now, sid))
        db.execute("DELETE FROM turns WHERE sid = ?", (sid,))

    def append(self, sid: str, record: dict | None, expected_turn: int | None = None, key: str | None = None,
               adapter: str | None = None):
        now = time.time()
        with self._tx() as db:
            self._expire(db, now)
            row = db.execute("SELECT n, closed, adapter FROM sessions WHERE sid = ?", (sid,)).fetchone()
            n, closed = (row[0], None if row[1] is None else row[0]) if row else (0, None)

            def stored_key(t):
                r = db.execute("SELECT key FROM turns WHERE sid = ? AND turn = ?", (sid, t)).fetchone()
                return None if r is None else r[0] or ""

            action = decide(sid, n, closed, expected_turn, key, stored_key)
            check_adapter(sid, n, adapter, row[2] if row else None)
            if action == "replay":
                turn = expected_turn
                answer = db.execute("SELECT answer FROM turns WHERE sid = ? AND turn = ?", (sid, turn)).fetchone()[0]
            elif record is None:
                return None
            else:
                turn, answer = n, None
                db.execute("INSERT INTO turns (sid, turn, key, record) VALUES (?, ?, ?, ?)", (sid, n, key, json.dumps(record)))
                # the adapter is written when the session starts, never updated: it is fixed for the session's life
                db.execute("INSERT INTO sessions (sid, n, touched, adapter) VALUES (?, ?, ?, ?) ON CONFLICT (sid) DO UPDATE "
                           "SET n = excluded.n, touched = excluded.touched", (sid, n + 1, now, adapter))
                db.execute("DELETE FROM turns WHERE sid = ? AND turn <= ?", (sid, n - self.max_turns))
                self._expire(db, now)  # again: this session may have taken the place of the least recently used
            rows = db.execute("SELECT record, prediction FROM turns WHERE sid = ? AND turn <= ? AND turn > ? ORDER BY turn",
                              (sid, turn, turn - self.max_turns)).fetchall()
        return turn, _kept(rows), None if answer is None else json.loads(answer)

    def annotate(self, sid: str, turn: int, prediction: dict, answer: dict | None = None) -> bool:
        """Keep turn ``turn``'s prediction (and full answer) with it (False: that turn is no longer kept)."""
        with self._tx() as db:
            cur = db.execute("UPDATE turns SET prediction = ?, answer = ? WHERE sid = ? AND turn = ?",
                             (json.dumps(prediction), None if answer is None else json.dumps(answer), sid, turn))
            return cur.rowcount == 1

    def get(self, sid: str) -> dict | None:
        """``{"n_turns", "turns", "adapter"}`` of an open session, or None."""
        db = self._db()
        row = db.execute("SELECT n, adapter FROM sessions WHERE sid = ? AND closed IS NULL AND touched >= ?",
                         (sid, time.time() - self.ttl_s)).fetchone()
        if row is None:
            return None
        rows = db.execute("SELECT record, prediction FROM turns WHERE sid = ? ORDER BY turn", (sid,)).fetchall()
        return {"n_turns": row[0], "turns": _kept(rows), "adapter": row[1]}

    def adapter(self, sid: str) -> str | None:
        """The adapter an open session is answered by (None: the ensemble, or no open session)."""
        row = self._db().execute("SELECT adapter FROM sessions WHERE sid = ? AND closed IS NULL AND touched >= ?",
                                 (sid, time.time() - self.ttl_s)).fetchone()
        return row[0] if row else None

    def delete(self, sid: str) -> bool:
        """Close an open session (it becomes a tombstone); False when it was not open."""
        with self._tx() as db:
            found = db.execute("SELECT 1 FROM sessions WHERE sid = ? AND closed IS NULL", (sid,)).fetchone() is not None
            if found:
                self._close(db, sid, time.time())
            return found

    def count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM sessions WHERE closed IS NULL").fetchone()[0]

    def pid(self) -> int:
        return os.getpid()


class RedisStore:
    """Sessions on a Redis server: per session a ``meta`` hash, a ``turns`` hash and, once closed, a ``closed`` key.

    Each append is one optimistic transaction (WATCH/MULTI/EXEC, retried when another writer got there first).
    Idle expiry is Redis's own key TTL; a ``seen`` key outlives the session by ``ttl_s`` and is its tombstone.
    """

    def __init__(self, url: str, prefix: str = "mer:sessions", ttl_s: float = 3600.0, max_sessions: int = 10000,
                 max_turns: int = 64, password: str | None = None):
        import redis

        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, **({"password": password} if password else {}))
        self.prefix, self.ttl_s, self.max_sessions, self.max_turns = prefix, ttl_s, max_sessions, max_turns
        self.ttl_ms = max(1, int(ttl_s * 1000))

    def _k(self, sid: str, part: str) -> str:
        return f"{self.prefix}:{{{sid}}}:{part}"  # {sid}: one hash slot per session on a Redis Cluster

    def append(self, sid: str, record: dict | None, expected_turn: int | None = None, key: str | None = None,
               adapter: str | None = None):
        import redis

        meta, turns, closed, seen = (self._k(sid, p) for p in ("meta", "turns", "closed", "seen"))
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(meta, turns, closed, seen)
                    n = int(p.hget(meta, "n") or 0)
                    tomb = p.get(closed)
                    if tomb is None and n == 0 and p.exists(seen):
                        tomb = p.get(seen)  # expired by its TTL: the tombstone says how far it got
                    stored = p.hgetall(turns)
                    def got(t, stored=stored):
                        return (json.loads(stored[str(t)])["key"] or "") if str(t) in stored else None

                    action = decide(sid, n, None if tomb is None else int(tomb), expected_turn, key, got)
                    check_adapter(sid, n, adapter, p.hget(meta, "adapter"))
                    if action == "replay":
                        p.unwatch()
                        turn = expected_turn
                        break
                    if record is None:
                        p.unwatch()
                        return None
                    turn = n
                    stored[str(n)] = json.dumps({"record": record, "key": key, "prediction": None, "answer": None})
                    drop = [t for t in stored if int(t) <= n - self.max_turns]
                    p.multi()
                    p.hset(turns, str(n), stored[str(n)])
                    if drop:
                        p.hdel(turns, *drop)
                    # the adapter is written when the session starts, never updated: it is fixed for the session's life
                    p.hset(meta, mapping={"n": n + 1, "touched": time.time(), **({"adapter": adapter} if n == 0 and adapter else {})})
                    p.pexpire(meta, self.ttl_ms)
                    p.pexpire(turns, self.ttl_ms)
                    p.set(seen, n + 1, px=2 * self.ttl_ms)
                    p.zadd(self._k("", "lru"), {sid: time.time()})
                    p.execute()
                    break
                except redis.WatchError:
                    continue
        self._evict()
        ts = [json.loads(stored[str(t)]) for t in range(max(0, turn - self.max_turns + 1), turn + 1) if str(t) in stored]
        answer = ts[-1]["answer"] if turn != n else None
        return turn, [{**t["record"], **({"prediction": t["prediction"]} if t["prediction"] else {})} for t in ts], answer

    def _evict(self) -> None:
        lru = self._k("", "lru")
        self.r.zremrangebyscore(lru, "-inf", time.time() - self.ttl_s)  # expired by their TTL already
        over = self.r.zcard(lru) - self.max_sessions
        for sid, _ in self.r.zpopmin(lru, over) if over > 0 else []:
            self.delete(sid)

    def annotate(self, sid: str, turn: int, prediction: dict, answer: dict | None = None) -> bool:
        import redis

        turns = self._k(sid, "turns")
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(turns)
                    raw = p.hget(turns, str(turn))
                    if raw is None:
                        p.unwatch()
                        return False
                    p.multi()
                    p.hset(turns, str(turn), json.dumps({**json.loads(raw), "prediction": prediction, "answer": answer}))
                    p.execute()
                    return True
                except redis.WatchError:
                    continue

    def get(self, sid: str) -> dict | None:
        n, adapter = self.r.hmget(self._k(sid, "meta"), ["n", "adapter"])
        if n is None:
            return None
        stored = self.r.hgetall(self._k(sid, "turns"))
        ts = [json.loads(stored[t]) for t in sorted(stored, key=int)]
        return {"n_turns": int(n), "turns": [{**t["record"], **({"prediction": t["prediction"]} if t["prediction"] else {})} for t in ts],
                "adapter": adapter}

    def adapter(self, sid: str) -> str | None:
        return self.r.hget(self._k(sid, "meta"), "adapter")

    def delete(self, sid: str) -> bool:
        n = self.r.hget(self._k(sid, "meta"), "n")
        if n is None:
            return False
        p = self.r.pipeline()  # MULTI: the session is gone and its tombstone set in one step
        p.set(self._k(sid, "closed"), n, px=self.ttl_ms)
        p.delete(self._k(sid, "meta"), self._k(sid, "turns"))
        p.zrem(self._k("", "lru"), sid)
        p.execute()
        return True

    def count(self) -> int:
        return self.r.zcount(self._k("", "lru"), time.time() - self.ttl_s, "+inf")

    def pid(self) -> int:
        return os.getpid()


def open_store(cfg, models_dir: str | Path):
    """The store ``cfg`` (a :class:`~mer_ray.serve.config.SessionConfig`) names, for a deployment of ``models_dir``."""
    limits = {"ttl_s": cfg.ttl_s, "max_sessions": cfg.max_sessions, "max_turns": cfg.max_turns}
    if cfg.backend == "redis":
        password = None
        if cfg.redis_password_env:
            password = os.environ.get(cfg.redis_password_env)
            if not password:
                raise RuntimeError(f"sessions.redis_password_env is {cfg.redis_password_env!r} but that environment variable is unset or empty")
        return RedisStore(cfg.redis_url, prefix=cfg.key_prefix, password=password, **limits)
    return SqliteStore(Path(cfg.dir).expanduser() if cfg.dir else default_dir(models_dir), busy_timeout_s=cfg.busy_timeout_s, **limits)

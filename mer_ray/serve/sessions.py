"""Streaming sessions: the turns of each dialogue, kept where no process death can lose them.

Why no Ray actor holds them: a store actor was one process whose death restarted
every session silently at turn 0 (issue 15). The default store is a SQLite file
on the node's local disk (:class:`~mer_ray.serve.session_stores.SqliteStore`),
opened by every Ingress replica of the node: WAL lets the replicas read while one
writes, ``busy_timeout`` queues their writes, and one transaction per write makes
each append atomic, so killing a replica at any instant leaves either the whole
turn or none of it. Sessions shared by replicas on several nodes need a server
all of them reach: ``backend: redis`` (:class:`~mer_ray.serve.session_stores.RedisStore`),
with the same interface and the same rules.

The rules, the same for both stores:

- a turn may carry ``expected_turn``; a turn already stored under that number
  with the same request key (a retried request) is answered from the store, never
  appended twice; any other mismatch is a :class:`SessionConflict` (HTTP 409);
- a session closed by ``DELETE``, by the idle ``ttl_s`` or by ``max_sessions``
  stays a tombstone for ``ttl_s``: its turns get 409, it is never restarted at
  turn 0 behind the client's back (a new session takes a fresh id).
- the adapter that answers a session (``None``: the ensemble) is fixed by its
  first turn and stored with it; a later turn answered by another is an
  :class:`AdapterConflict` (HTTP 422 naming both), checked in the same transaction
  as the append, so two first turns racing with different adapters cannot both win.

A turn record is what the next turn needs (speaker, text, feature vectors, never
raw media), its request key, its ``prediction`` (the per-speaker summary's input)
and its full ``answer`` (what a retry gets back).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class SessionConflict(Exception):
    """A turn the session cannot take (HTTP 409): ``next_turn`` is the turn it would take next."""

    def __init__(self, message: str, next_turn: int):
        super().__init__(message)
        self.message, self.next_turn = message, next_turn


class AdapterConflict(ValueError):
    """A turn asks for another adapter than the one its session is answered by (HTTP 422)."""


def _who(adapter: str | None) -> str:
    return "the ensemble (no adapter)" if adapter is None else f"adapter {adapter[:80]!r}"


def check_adapter(sid: str, n: int, asked: str | None, fixed: str | None) -> None:
    """Raise :class:`AdapterConflict` unless a turn answered by ``asked`` may join session ``sid``.

    Args:
        n: turns the session holds (0: it starts with this turn, which fixes its adapter to ``asked``).
        fixed: the adapter stored with the session (None: the ensemble answers it).
    """
    if n and asked != fixed:
        raise AdapterConflict(f"session {sid!r} is answered by {_who(fixed)}, fixed by its first turn; this turn asks for "
                              f"{_who(asked)}. Leave the adapter out to continue the session, or start a new session")


def turn_key(payload: dict, adapter: str | None) -> str:
    """:func:`request_key` of a turn answered by ``adapter``: the adapter counts whether the header or the body named
    it, and a turn without one keys exactly as before adapters existed (a retry across an upgrade still replays)."""
    body = {k: v for k, v in payload.items() if k != "model"}
    return request_key({**body, "adapter": adapter} if adapter else body)


def request_key(payload: dict) -> str:
    """The idempotency key of a turn request: a digest of everything but ``expected_turn``."""
    body = {k: v for k, v in payload.items() if k != "expected_turn"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def decide(sid: str, n: int, closed: int | None, expected: int | None, key: str | None, stored_key) -> str:
    """What an append does: ``"append"`` turn ``n``, or ``"replay"`` the stored turn ``expected``; else raise.

    Args:
        n: turns the session holds (0 for an unknown id).
        closed: None for an open or unknown session; the turns it held when it was closed (a tombstone).
        expected: the request's ``expected_turn`` (None: append at ``n``, with no retry protection).
        key: the request's key; ``stored_key``: a callable giving the key stored with turn ``expected`` (or None).
    """
    if closed is not None:
        raise SessionConflict(f"session {sid!r} was closed (deleted or expired) after {closed} turns; its id is not "
                              "reused while its tombstone lasts (ttl_s): start a new session with a fresh id", closed)
    if expected is None or expected == n:
        return "append"
    if expected < n:
        have = stored_key(expected)
        if have is not None and key is not None and have == key:
            return "replay"
        why = "is no longer kept" if have is None else "holds a different request"
        raise SessionConflict(f"session {sid!r}: turn {expected} {why}; the next turn is {n}", n)
    raise SessionConflict(f"session {sid!r}: expected_turn {expected} is ahead of the session; the next turn is {n}", n)


def default_dir(models_dir: str | Path) -> Path:
    """``<models_dir>/../sessions``: local disk, and never shared by two models dirs (their features differ)."""
    return Path(models_dir).expanduser().resolve().parent / "sessions"


def speaker_summary(turns: list[dict], label_set: str, last: int = 5) -> dict[str, dict]:
    """Per speaker, their last ``last`` kept turns answered in ``label_set``: ``{turns, labels, mean_probs}``.

    Args:
        turns: session turn records, oldest first; those without a ``prediction`` (``{turn, label_set, label,
            probs}``; a turn whose answer was never stored) are skipped, as are answers in another label set,
            whose labels could not be averaged with these.
        label_set: the label set of the current answer.
        last: turns per speaker.
    """
    by: dict[str, list[dict]] = {}
    for r in turns:
        p = r.get("prediction")
        if p and p.get("label_set") == label_set:
            by.setdefault(r["speaker"], []).append(p)
    out = {}
    for speaker, ps in by.items():
        ps = ps[-last:]
        out[speaker] = {"turns": [p["turn"] for p in ps], "labels": [p["label"] for p in ps],
                        "mean_probs": {lab: sum(p["probs"][lab] for p in ps) / len(ps) for lab in ps[-1]["probs"]}}
    return out

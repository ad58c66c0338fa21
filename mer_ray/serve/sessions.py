"""Streaming sessions: the turns of each dialogue, shared by every replica.

Why a named, detached Ray actor: Serve replicas come and go (autoscaling,
crashes), so a session cannot live in one replica's memory. Every replica looks
the store up by name, so a new or restarted replica sees the same sessions; the
actor is detached, so it outlives the replica that created it, and it is
restarted by Ray if it dies (``max_restarts=-1``). A file store would need a
disk shared by every node of a cluster, which Serve does not give; an external
database (Redis) is one more service to run. The actor keeps only what the next
turn needs (speaker, text and the extracted feature vectors, never raw media)
and each turn's answer when it arrived (``prediction``: the per-speaker summary),
bounded by ``max_turns`` per session, ``max_sessions`` and an idle TTL. With
``persist_dir`` set, each session is also written to disk (atomically), so a
restarted store actor reloads them.

:class:`SessionStore` is a plain class, usable without Ray.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path


class SessionStore:
    """Bounded LRU map from session id to its list of turn records (plain dicts)."""

    def __init__(self, ttl_s: float = 3600.0, max_sessions: int = 10000, max_turns: int = 64, persist_dir: str | None = None):
        self.ttl_s, self.max_sessions, self.max_turns = ttl_s, max_sessions, max_turns
        self.persist = Path(persist_dir) if persist_dir else None
        self._data: OrderedDict[str, dict] = OrderedDict()
        if self.persist:
            self.persist.mkdir(parents=True, exist_ok=True)
            for f in sorted(self.persist.glob("*.json")):
                try:
                    self._data[f.stem] = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue  # a torn file from a crash: drop that one session

    def _expire(self) -> None:
        now = time.time()
        for sid in [s for s, v in self._data.items() if now - v["touched"] > self.ttl_s]:
            self.delete(sid)
        while len(self._data) > self.max_sessions:
            self.delete(next(iter(self._data)))

    def _save(self, sid: str) -> None:
        if self.persist:
            tmp = self.persist / f".{sid}.tmp"
            tmp.write_text(json.dumps(self._data[sid]))
            os.replace(tmp, self.persist / f"{sid}.json")

    def append(self, sid: str, record: dict) -> tuple[int, list[dict]]:
        """Add one turn; return its 0-based turn number and the kept turns, this one last."""
        self._expire()
        s = self._data.pop(sid, None) or {"turns": [], "n": 0}
        s["turns"] = (s["turns"] + [record])[-self.max_turns:]
        s["n"] += 1
        s["touched"] = time.time()
        self._data[sid] = s
        self._save(sid)
        return s["n"] - 1, list(s["turns"])

    def annotate(self, sid: str, turn: int, prediction: dict) -> bool:
        """Keep turn ``turn``'s answer with it (False: the session or that turn is no longer kept)."""
        s = self._data.get(sid)
        if s is None:
            return False
        k = len(s["turns"]) - (s["n"] - turn)  # turns are kept in order, the newest last
        if not 0 <= k < len(s["turns"]):
            return False
        s["turns"][k] = {**s["turns"][k], "prediction": prediction}
        self._save(sid)
        return True

    def get(self, sid: str) -> dict | None:
        """``{"n_turns", "turns"}`` of a session, or None."""
        self._expire()
        s = self._data.get(sid)
        return None if s is None else {"n_turns": s["n"], "turns": list(s["turns"])}

    def delete(self, sid: str) -> bool:
        found = self._data.pop(sid, None) is not None
        if self.persist:
            (self.persist / f"{sid}.json").unlink(missing_ok=True)
        return found

    def count(self) -> int:
        return len(self._data)

    def pid(self) -> int:
        return os.getpid()


def speaker_summary(turns: list[dict], label_set: str, last: int = 5) -> dict[str, dict]:
    """Per speaker, their last ``last`` kept turns answered in ``label_set``: ``{turns, labels, mean_probs}``.

    Args:
        turns: session turn records, oldest first; those without a ``prediction`` (``{turn, label_set, label,
            probs}``; files written before predictions were kept) are skipped, as are answers in another label set,
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


def get_store(cfg):
    """The named store actor for ``cfg`` (a :class:`~mer_ray.serve.config.SessionConfig`), created if missing."""
    import ray

    actor = ray.remote(SessionStore).options(
        name=cfg.actor_name, namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_concurrency=1,
    )
    return actor.remote(cfg.ttl_s, cfg.max_sessions, cfg.max_turns, cfg.persist_dir)

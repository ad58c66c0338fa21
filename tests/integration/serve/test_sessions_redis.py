"""The Redis session store against a real ``redis-server`` (Debian's), started by the fixture on a free
127.0.0.1 port in a temporary folder and stopped after: the same contract as SQLite, sessions that outlive
the client process, and a server restart with its append-only file losing no acknowledged turn."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import pytest

from mer_ray.serve.config import SessionConfig
from mer_ray.serve.session_stores import RedisStore, open_store
from mer_ray.serve.sessions import SessionConflict
from tests.unit.serve.test_sessions import check_adapter_contract, check_contract, rec


def _redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:  # the Makefile installs it; try once here too (needs root and Debian's mirror)
        r = subprocess.run(["apt-get", "install", "-y", "redis-server"], capture_output=True, text=True, timeout=300)
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip(f"redis-server absent and `apt-get install -y redis-server` failed: {(r.stderr or r.stdout)[-300:]}")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, exe: str, folder, port: int):
        self.exe, self.folder, self.port, self.proc = exe, folder, port, None

    def start(self, password: str | None = None) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                                      "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                      *(["--requirepass", password] if password else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.time() + 30
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1, password=password).ping()
                return
            except redis.exceptions.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def server(tmp_path):
    srv = Server(_redis_server(), tmp_path, _free_port())
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


def test_redis_store_contract(server):
    check_contract(lambda **kw: RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:8]}", **kw))


def test_redis_store_keeps_a_sessions_adapter(server):
    check_adapter_contract(lambda **kw: RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:8]}", **kw))


def test_redis_sessions_survive_a_server_kill_with_appendonly(server):
    cfg = SessionConfig(backend="redis", redis_url=server.url)
    s = open_store(cfg, "unused")
    for i in range(5):
        assert s.append("sid", rec(i), i, str(i))[0] == i
    server.kill()  # SIGKILL: only the append-only file (fsync always) keeps the acknowledged turns
    server.start()
    s = open_store(cfg, "unused")  # a new client, as a restarted Ingress replica would make
    assert [t["text"] for t in s.get("sid")["turns"]] == [f"turn {i}" for i in range(5)]
    assert s.append("sid", rec(4), 4, str(4))[0] == 4 and s.get("sid")["n_turns"] == 5  # a retry: not a sixth turn
    with pytest.raises(SessionConflict) as e:
        s.append("sid", rec(7), 7, "7")
    assert e.value.next_turn == 5


def test_a_password_comes_from_the_environment_never_the_config(tmp_path, monkeypatch):
    import redis

    srv = Server(_redis_server(), tmp_path, _free_port())
    srv.start(password="s3cret-pw")
    try:
        cfg = SessionConfig(backend="redis", redis_url=f"redis://127.0.0.1:{srv.port}/0", redis_password_env="MER_TEST_REDIS_PW")
        monkeypatch.delenv("MER_TEST_REDIS_PW", raising=False)
        with pytest.raises(RuntimeError, match="MER_TEST_REDIS_PW.*unset or empty"):
            open_store(cfg, "unused")
        monkeypatch.setenv("MER_TEST_REDIS_PW", "wrong")
        with pytest.raises(redis.exceptions.AuthenticationError):
            open_store(cfg, "unused").append("s1", rec(0))
        monkeypatch.setenv("MER_TEST_REDIS_PW", "s3cret-pw")
        store = open_store(cfg, "unused")
        store.append("s1", rec(0))
        assert store.get("s1")["n_turns"] == 1
    finally:
        srv.kill()

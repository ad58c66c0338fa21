"""Start llama-cpp-python's OpenAI-compatible server on a GGUF, and wait until it answers.

The ``ray_data_http`` Lantern backend's test and ``mer bench lantern --part backends`` both
need a real server with known settings; this is the one place that starts it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(model: str, log: str | Path, alias: str = "gemma3", n_ctx: int = 1024, n_batch: int = 512,
                 n_threads: int = 1, cache: bool = False, start_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``python -m llama_cpp.server`` for the duration of the block; yields its ``.../v1`` URL.

    Args:
        model: a GGUF path or an embedded name (``gemma3-270m``).
        log: file that receives the server's stdout and stderr.
        alias: the served model name (requests' ``model``).
        n_ctx, n_batch, n_threads: llama.cpp context settings; ``n_threads`` is used for batches too.
        cache: the server's RAM prompt-state cache (its reuse of the previous request's prefix is always on).
        start_timeout_s: how long to wait for ``GET /v1/models`` to answer 200.

    Raises:
        RuntimeError: the server exited, or did not answer in time; the message names the log.
    """
    import httpx

    from mer_ray.assets import gguf_path

    port = free_port()
    with open(log, "w") as fh:
        # logits_all: the server's logprobs need every position's logits
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path(model)),
                                 "--model_alias", alias, "--host", "127.0.0.1", "--port", str(port),
                                 "--n_ctx", str(n_ctx), "--n_batch", str(n_batch), "--n_threads", str(n_threads),
                                 "--n_threads_batch", str(n_threads), "--cache", str(cache).lower(),
                                 "--logits_all", "true"], stdout=fh, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.time() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(url + "/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not answer in {start_timeout_s:.0f} s; see {log}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

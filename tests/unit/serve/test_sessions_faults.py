"""The Ingress's answer to a dying stage replica, without Ray running: the request's stage calls are retried,
and when the retries run out the answer is a 503 with Retry-After; other failures keep their own status."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from mer_ray.serve import ingress
from mer_ray.serve.featurize import MediaError
from mer_ray.serve.http import RETRY_AFTER_S, ApiError, error_response

Ingress = ingress.Ingress.func_or_class


def _flaky(errors: list[BaseException]):
    calls = []

    async def make():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    return make, calls


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(ingress, "BACKOFF_S", 0.0)


def test_a_dead_replica_is_retried_until_a_live_one_answers():
    make, calls = _flaky([ActorDiedError(), ActorUnavailableError("gone", b"\0" * 16), BackPressureError(num_queued_requests=1,
                                                                                                           max_queued_requests=1)])
    assert asyncio.run(Ingress._run(None, make)) == "ok" and len(calls) == 4


def test_retries_run_out_into_503_with_retry_after():
    make, calls = _flaky([ActorDiedError()] * ingress.ATTEMPTS)
    with pytest.raises(ApiError) as e:
        asyncio.run(Ingress._run(None, make))
    assert e.value.status == 503 and e.value.retry_after == RETRY_AFTER_S and len(calls) == ingress.ATTEMPTS
    r = error_response(503, e.value.body())
    assert r.status_code == 503 and r.headers["retry-after"] == str(RETRY_AFTER_S)
    assert json.loads(r.body)["error"].startswith("temporarily unavailable (ActorDiedError)")


def test_a_client_error_and_a_bug_are_not_retried():
    make, calls = _flaky([MediaError("video_b64: not a video")])
    with pytest.raises(ApiError) as e:
        asyncio.run(Ingress._run(None, make))
    assert e.value.status == 422 and len(calls) == 1
    make, calls = _flaky([KeyError("bug")])
    with pytest.raises(KeyError):
        asyncio.run(Ingress._run(None, make))
    assert len(calls) == 1
    assert "retry-after" not in error_response(409, {"error": "x", "next_turn": 2}).headers

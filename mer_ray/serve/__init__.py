"""The mer ensemble on Ray Serve: FastAPI ingress, stage deployments, sessions, app builder.

- :func:`build_app` / :func:`mer_ray.serve.app.app_builder`: the bound application;
- :func:`mer_ray.serve.run.serve_local`: what ``mer serve`` does;
- :func:`demo_request`: a real request to a running service, printed (``make demo``'s last step).

See ``docs/serve.md``.
"""

from mer_ray.serve.app import app_builder, build_app
from mer_ray.serve.demo import demo_request

__all__ = ["app_builder", "build_app", "demo_request"]

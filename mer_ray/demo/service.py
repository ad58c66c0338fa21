"""``make demo``'s last step: start the service on the demo models and send the sample request."""

from __future__ import annotations

from mer_ray.serve.client import SAMPLE_DIALOGUE, recognize

__all__ = ["SAMPLE_DIALOGUE", "recognize", "serve_demo"]


def serve_demo(models_dir: str, port: int = 8000, use_llm: bool = True, stop: bool = True) -> str:
    """Start the service on ``models_dir`` (on the Ray this process has, or a new local one), send
    :data:`~mer_ray.serve.client.SAMPLE_DIALOGUE`, print the answer and the URL; shut Serve down after unless ``stop`` is False."""
    from mer_ray.serve.deploy import serve_local

    url = serve_local(models_dir=str(models_dir), port=port, no_llm=not use_llm)
    try:
        recognize(url, use_llm=use_llm)
    finally:
        if stop:
            from ray import serve

            serve.shutdown()
    return url

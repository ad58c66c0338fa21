"""The summary of ``mer bench serve``: each side's fastest setting, the ratios, batch sizes and a paper model.

Rows of the sweep table (``results``) carry ``mode`` (``serve``, ``uvicorn``,
``inprocess``, ``inprocess_batched``), their setting (``layout``,
``torch_threads``, ``pool``), ``concurrency``, ``use_llm`` and the measured
figures. A side's fastest setting is the one with the most requests/s at the top
concurrency without the LLM; every ratio compares those settings.
"""

from __future__ import annotations

SETTING = {"serve": ("layout", "torch_threads"), "uvicorn": ("torch_threads", "pool"), "inprocess": ("torch_threads",),
           "inprocess_batched": ("torch_threads",)}


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in SETTING[row["mode"]])


def best(rows: list[dict], mode: str, top: int, **where) -> dict | None:
    """The row of ``mode``'s fastest setting at concurrency ``top`` without the LLM (``where``: extra filters)."""
    cand = [r for r in rows if r["mode"] == mode and r["concurrency"] == top and not r["use_llm"]
            and all(r.get(k) == v for k, v in where.items())]
    return max(cand, key=lambda r: r["rps"], default=None)


def at(rows: list[dict], like: dict | None, concurrency: int) -> dict | None:
    """The row of ``like``'s setting at another concurrency."""
    if like is None:
        return None
    return next((r for r in rows if r["mode"] == like["mode"] and _key(r) == _key(like) and r["concurrency"] == concurrency
                 and not r["use_llm"]), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def batch_sizes(rows: list[dict], like: dict | None) -> dict:
    """``{deployment: {concurrency: mean batch size or None}}`` for ``like``'s Serve setting."""
    out: dict[str, dict] = {}
    for r in rows:
        if like is not None and r["mode"] == "serve" and _key(r) == _key(like) and not r["use_llm"]:
            for dep, b in (r.get("batch") or {}).items():
                out.setdefault(dep, {})[str(r["concurrency"])] = None if b is None else b.get("mean")
    return out


def cpu_ms_per_request(row: dict | None) -> dict[str, float]:
    """CPU ms per request by process group of a Serve or uvicorn row (the load generator left out)."""
    if not row or not row.get("cpu_s"):
        return {}
    ok = max(1, row["requests"] - row["errors"])
    return {k: round(v / ok * 1e3, 2) for k, v in row["cpu_s"].items() if k != "load_generator"}


def paper_model(serve16: dict | None, uvicorn16: dict | None, stages: dict | None, cores: int, nodes=(1, 2, 4, 8, 16)) -> dict:
    """Requests/s that N nodes of ``cores`` cores would give, from the CPU each request cost here.

    Assumes the work is CPU-bound and splits without loss: Serve with a proxy and a replica of each stage on every
    node (``proxy_location: EveryNode``), uvicorn as N processes behind a load balancer; clients, the balancer and the
    network between nodes cost nothing. The per-request CPU is what this run measured at the top concurrency for each
    side's fastest setting (so Serve's figure includes whatever batching saved).
    """
    s, u = cpu_ms_per_request(serve16), cpu_ms_per_request(uvicorn16)
    s_total, u_total = sum(s.values()), sum(u.values())
    compute = (stages or {}).get("featurize", 0) + (stages or {}).get("vanilla", 0)
    out = {"cores_per_node": cores, "serve_cpu_ms_per_request": s, "serve_cpu_ms_total": round(s_total, 2),
           "uvicorn_cpu_ms_per_request": round(u_total, 2), "stage_cpu_ms_inprocess": stages,
           "serve_overhead_cpu_ms": round(s_total - compute, 2) if s_total and compute else None,
           "assumptions": paper_model.__doc__.split("\n\n")[1].replace("\n    ", " ").strip()}
    out["rps"] = {str(n): {"serve": round(n * cores * 1e3 / s_total, 1) if s_total else None,
                           "uvicorn": round(n * cores * 1e3 / u_total, 1) if u_total else None,
                           "compute_bound": round(n * cores * 1e3 / compute, 1) if compute else None} for n in nodes}
    if s.get("proxy"):  # proxy_location: HeadOnly puts every request through the head's proxy
        out["head_only_proxy_cap_rps"] = round(cores * 1e3 / s["proxy"], 1)
    return out


def summarize(report: dict, levels: list[int]) -> dict:
    """The issue 16 keys, computed from ``report["results"]``; returns the keys to merge into the report."""
    rows, top = report["results"], max(levels)
    s, u = best(rows, "serve", top), best(rows, "uvicorn", top)
    p, b = best(rows, "inprocess", top), best(rows, "inprocess_batched", top)
    s1, u1 = at(rows, s, 1), at(rows, u, 1)
    out = {"at_concurrency": top, "errors": sum(r["errors"] for r in rows),
           "serve_over_uvicorn": _ratio(s and s["rps"], u and u["rps"]),
           "serve_over_inprocess": _ratio(s and s["rps"], p and p["rps"]),
           "serve_over_inprocess_batched": _ratio(s and s["rps"], b and b["rps"]),
           "p99_over_p50": _ratio(s and s["p99_ms"], s and s["p50_ms"]),
           "c1_p50_over_uvicorn": _ratio(s1 and s1["p50_ms"], u1 and u1["p50_ms"]),
           "mean_batch_size": batch_sizes(rows, s)}
    out["fastest"] = {m: None if r is None else {k: r.get(k) for k in (*SETTING[m], "rps", "p50_ms", "p99_ms")}
                      for m, r in (("serve", s), ("uvicorn", u), ("inprocess", p), ("inprocess_batched", b))}
    out["by_layout"] = {}
    for layout in dict.fromkeys(r["layout"] for r in rows if r["mode"] == "serve"):
        sl = best(rows, "serve", top, layout=layout)
        sl1 = at(rows, sl, 1)
        out["by_layout"][layout] = {"torch_threads": sl and sl["torch_threads"], "rps": sl and sl["rps"],
                                    "serve_over_uvicorn": _ratio(sl and sl["rps"], u and u["rps"]),
                                    "serve_over_inprocess": _ratio(sl and sl["rps"], p and p["rps"]),
                                    "p99_over_p50": _ratio(sl and sl["p99_ms"], sl and sl["p50_ms"]),
                                    "c1_p50_over_uvicorn": _ratio(sl1 and sl1["p50_ms"], u1 and u1["p50_ms"]),
                                    "mean_batch_size": batch_sizes(rows, sl)}
    out["paper_model"] = paper_model(s, u, report.get("stage_cpu_ms"), report["machine"]["cores"])
    g = out
    out["goals"] = {"zero_errors": g["errors"] == 0,
                    "serve_over_uvicorn_at_least_1.0": bool(g["serve_over_uvicorn"] and g["serve_over_uvicorn"] >= 1.0),
                    "serve_over_inprocess_at_least_0.8": bool(g["serve_over_inprocess"] and g["serve_over_inprocess"] >= 0.8),
                    "p99_over_p50_at_most_3": bool(g["p99_over_p50"] and g["p99_over_p50"] <= 3),
                    "c1_p50_over_uvicorn_at_most_1.3": bool(g["c1_p50_over_uvicorn"] and g["c1_p50_over_uvicorn"] <= 1.3)}
    return out

"""Golden outputs that pin behaviour across refactors: computed by the code, compared bit for bit.

``python -m tests.golden.outputs --meld-dir DIR`` (re)writes ``tests/golden/*.npz`` and
``fingerprint.json``; ``tests/integration/test_golden.py`` recomputes and compares.

Bit equality of float kernels (llama.cpp, torch, openSMILE) is defined only on the CPU
and wheels that produced them, so the fingerprint records those; elsewhere the test skips
and says so (regenerate there first, then refactor).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


def fingerprint() -> dict:
    """What bit-identity of the float outputs depends on."""
    from importlib.metadata import version

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    pkgs = ("torch", "llama_cpp_python", "opensmile", "av", "numpy", "transformers", "peft")
    return {"cpu": cpu, "machine": platform.machine(), **{p: version(p.replace("_", "-")) for p in pkgs}}


def dev_vanilla(meld_dir: Path, n_dialogues: int = 20):
    """The first ``n_dialogues`` MELD dev dialogues with seeded Dirichlet 'vanilla' references (no gold)."""
    import json as _json

    import pyarrow as pa
    import pyarrow.compute as pc

    from mer_ray.data.leak import strip_gold
    from mer_ray.data.loaders import load_meld

    t = strip_gold(load_meld(meld_dir, "dev"))
    keep = list(dict.fromkeys(t["dialogue_id"].to_pylist()))[:n_dialogues]
    t = t.filter(pc.is_in(t["dialogue_id"], pa.array(keep)))
    probs = np.random.default_rng(0).dirichlet(np.ones(7), t.num_rows).astype(np.float32)
    out = pa.table({"dialogue_id": t["dialogue_id"], "turn": t["turn"], "speaker": t["speaker"], "text": t["text"],
                    "split": t["split"], "emotion_probs": pa.array(list(probs), pa.list_(pa.float32()))})
    return out.replace_schema_metadata({"emotion_labels": _json.dumps(LABELS)})


def lantern(meld_dir: Path):
    """Lantern's label log-probabilities per query on 20 dev dialogues (SmolLM2, sizes {4, whole}, stride 2).

    Returns:
        ``(arrays, llm_table)``: the golden arrays, and the query+result table fusion reads.
    """
    import pyarrow as pa

    from mer_ray.lantern.job import ScorerWorker, _groups
    from mer_ray.lantern.queries import build_queries, with_content_free
    from mer_ray.llm.backends import prompt_format_for
    from mer_ray.llm.prompts import PromptTemplate

    backend = {"kind": "llama_cpp", "model": "smollm2-135m-instruct", "n_threads": 2, "n_ctx": 2048}
    chat, bos, eos = prompt_format_for(backend)
    tpl = PromptTemplate.load()
    q = build_queries(dev_vanilla(meld_dir), tpl, [4, None], stride=2, chat_template=chat, bos_token=bos, eos_token=eos)
    q = with_content_free(q, tpl, LABELS, chat, bos, eos)
    worker = ScorerWorker(backend, tpl.labels(LABELS, chat is not None))
    res = pa.concat_tables([worker({k: [v] for k, v in g.items()}) for g in _groups(q, 400)])
    q, res = q.sort_by("query_id"), res.sort_by("query_id")
    assert q["query_id"].to_pylist() == res["query_id"].to_pylist()
    joined = q.drop_columns(["prompt"])
    for name in res.column_names:
        if name != "query_id":
            joined = joined.append_column(name, res[name])
    arrays = {"query_ids": np.array(q["query_id"].to_pylist()),
              "logprobs": np.array(res["llm_logprobs"].to_pylist(), dtype=np.float64),
              "prompt_sha": np.array([_sha(p) for p in q["prompt"].to_pylist()])}
    return arrays, joined


def _sha(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()[:16]


def fusion(meld_dir: Path, llm) -> dict[str, np.ndarray]:
    """Fusion weights fitted on the golden Lantern outputs (gold of dev used as the target only)."""
    from mer_ray.data.loaders import load_meld
    from mer_ray.lantern import fit as F

    van = dev_vanilla(meld_dir)
    gold_t = load_meld(meld_dir, "dev")
    gold = {(d, t): lab for d, t, lab in zip(gold_t["dialogue_id"].to_pylist(), gold_t["turn"].to_pylist(),
                                             gold_t["label"].to_pylist())}
    data = F.assemble(van, llm, calibrated=True, gold=gold, labels=LABELS)
    model = F.fit(data, steps=40, weight_decay=1e-2, seed=0)
    out = {f"w/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    out["predict"] = F.predict(model, data)
    return out


def mllm(meld_dir: Path, work: Path) -> dict[str, np.ndarray]:
    """A tiny FARCER model (tiny Gemma 3, projector-free, LoRA), 3 plain AdamW steps, then `mer predict llm`'s table on 50 dev utterances."""
    import torch

    from mer_ray.mllm.artifacts import save_artifacts
    from mer_ray.mllm.build import ModelConfig, build_mllm, set_trainable
    from mer_ray.mllm.examples import Collator, DataConfig, PromptConfig, build_example, load_dialogues, sample_shots
    from mer_ray.mllm.predict import MLLMPredictor, predict_table
    from mer_ray.mllm.tiny import build_tiny_lm

    base = build_tiny_lm(work / "tiny_base", "gemma3")
    torch.manual_seed(0)
    cfg = ModelConfig(base=str(base))
    model, tok = build_mllm(cfg)
    set_trainable(model)
    data = DataConfig(meld_dir=str(meld_dir), max_dialogues={"train": 3})
    train = load_dialogues(data, "train", {})
    prompt = PromptConfig(n_shots=3)
    shots = sample_shots(train, 3, 0, tuple(LABELS))
    ex = [build_example(d, i, prompt, tuple(LABELS), shots, [r.get("label") for r in d.rows])
          for d in train for i in range(len(d.rows))][:8]
    col = Collator(tok, tuple(LABELS), None, prompt.max_tokens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(col(ex[step * 2:(step + 1) * 2], train=True))
        loss.backward()
        opt.step()
        opt.zero_grad()
    meta = {"labels": LABELS, "label_set": "meld7", "model": cfg.model_dump(), "prompt": prompt.model_dump(),
            "shots": [list(s) for s in shots], "template_version": "farcer-v1", "base_model": cfg.base}
    save_artifacts(work / "tiny_ft", model.state_dict(), model, meta)
    pred = MLLMPredictor.from_dir(work / "tiny_ft")
    dev = load_dialogues(DataConfig(meld_dir=str(meld_dir)), "dev", {})
    keys, n = set(), 0
    for d in dev:
        for r in d.rows:
            if n < 50:
                keys.add((d.dialogue_id, int(r["turn"])))
                n += 1
    t = predict_table(pred, dev, "dev", keys)
    return {"keys": np.array([f"{d}|{k}" for d, k in zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist())]),
            "probs": np.array(t["emotion_probs"].to_pylist(), dtype=np.float32)}


def extraction(work: Path) -> dict[str, np.ndarray]:
    """The feature store of the test media (tests/media.py), extracted in-process."""
    import pyarrow as pa

    from mer_ray.features.local import run_local
    from tests.media import build_media_set

    rows = build_media_set(work / "media", work / "outside")
    rows = [r for r in rows if r["case"] != "corrupt"]  # its bytes are random on purpose
    manifest = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("expect", "reason")} for r in rows])
    t = run_local(manifest, media_root=work / "media").sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])
    # JSON keeps every float exactly (shortest round-trip repr); paths are made relative to the run.
    return {f"c/{name}": np.array([json.dumps(v).replace(str(work), "<work>") for v in t[name].to_pylist()])
            for name in t.column_names}


def compute_all(meld_dir: Path, work: Path) -> dict[str, dict[str, np.ndarray]]:
    lan, llm = lantern(meld_dir)
    return {"lantern": lan, "fusion": fusion(meld_dir, llm), "mllm": mllm(meld_dir, work), "extraction": extraction(work)}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--meld-dir", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outs = compute_all(args.meld_dir, Path(tmp))
    for name, arrays in outs.items():
        np.savez_compressed(HERE / f"{name}.npz", **arrays)
    (HERE / "fingerprint.json").write_text(json.dumps(fingerprint(), indent=1) + "\n")
    print(json.dumps({k: {a: list(v.shape) for a, v in d.items()} for k, d in outs.items()}, indent=1))


if __name__ == "__main__":
    main()

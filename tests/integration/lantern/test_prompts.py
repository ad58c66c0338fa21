"""Prompt templates, query building, and the gold-leak guarantees of Lantern prompts."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer_ray.data.leak import GoldLeakError, strip_gold
from mer_ray.lantern.queries import build_queries, few_shot_examples, parse_sizes, with_content_free
from mer_ray.llm.prompts import PromptTemplate

LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


def _toy_vanilla(table: pa.Table) -> pa.Table:
    """A deterministic stand-in 'vanilla model' of the text only (inputs are gold-stripped)."""
    table = strip_gold(table)
    probs = []
    for text in table["text"].to_pylist():
        rng = np.random.default_rng(sum(map(ord, text or "")))
        probs.append(rng.dirichlet(np.ones(7)).astype(np.float32))
    out = pa.table({"dialogue_id": table["dialogue_id"], "turn": table["turn"], "speaker": table["speaker"],
                    "text": table["text"], "split": table["split"],
                    "emotion_probs": pa.array(probs, pa.list_(pa.float32())),
                    "sentiment_probs": pa.nulls(table.num_rows, pa.list_(pa.float32())),
                    "vad": pa.nulls(table.num_rows, pa.list_(pa.float32()))})
    return out.replace_schema_metadata({"emotion_labels": json.dumps(LABELS)})


def test_template_file_and_rendering():
    t = PromptTemplate.load("lantern_v1")
    assert t.tag == "lantern_v1@v1" and t.meta.top_k == 3
    assert t.labels(["joy"], chat=False) == [" joy"] and t.labels(["joy"], chat=True) == ["joy"]
    with pytest.raises(FileNotFoundError, match="shipped"):
        PromptTemplate.load("no_such_template")
    assert parse_sizes("4, 8,whole") == [4, 8, None]
    with pytest.raises(ValueError, match="bad receptive-field size"):
        parse_sizes("4,-1")

    v2 = PromptTemplate.load()
    assert v2.tag == "lantern_v2@v1"  # the default


def test_default_template_shares_everything_but_the_target_line(meld_dir):
    """lantern_v2: the targets of one field differ only after the last 'Target utterance' line,
    so the KV cache reuses the instructions, the field and the question for every target."""
    import os

    from mer_ray.data.loaders import load_meld

    van = _toy_vanilla(load_meld(meld_dir, "dev"))
    q = build_queries(van, PromptTemplate.load(), [None], max_dialogues=3)
    by_dialogue: dict[str, list] = {}
    for r in q.to_pylist():
        by_dialogue.setdefault(r["dialogue_id"], []).append(r)
    field = max(by_dialogue.values(), key=len)
    assert len(field) >= 3
    prompts = [r["prompt"] for r in field]
    common = os.path.commonprefix(prompts)
    assert common.endswith("Target utterance: [")
    assert "Answer with one word from: neutral, joy" in common and common.count("(reference: ") == len(field)
    for r in field:  # each suffix is one line naming the target, then the answer cue
        suffix = r["prompt"][len(common) - len("Target utterance: ["):]
        assert suffix.count("\n") == 1 and suffix.endswith("Emotion:")
    v1 = build_queries(van, PromptTemplate.load("lantern_v1"), [None], max_dialogues=3)
    assert len(os.path.commonprefix(v1["prompt"].to_pylist()[:len(field)])) < len(common)  # v1 asks after the target


def test_queries_cover_every_field_and_target(meld_dir):
    from mer_ray.data.loaders import load_meld

    van = _toy_vanilla(load_meld(meld_dir, "dev"))
    tpl = PromptTemplate.load()
    q = build_queries(van, tpl, [4, None], stride=2, max_dialogues=3)
    from mer_ray.data.fields import receptive_fields
    from mer_ray.lantern.queries import dialogues

    dias = list(dialogues(van).items())[:3]
    expect = sum(len(f) for _, rows in dias for f in receptive_fields(len(rows), [4, None], 2))
    assert q.num_rows == expect == len(set(q["query_id"].to_pylist()))
    row = q.slice(0, 1).to_pylist()[0]
    rows = dias[0][1]
    target = rows[row["target_pos"]]
    assert f'Target utterance: [{row["target_pos"] - row["field_start"] + 1}] {target["speaker"]}' in row["prompt"]
    assert "(reference: " in row["prompt"] and row["prompt"].endswith("Emotion:")
    q2 = with_content_free(q, tpl, LABELS)
    assert q2.num_rows == q.num_rows + 1 and '"N/A"' in q2["prompt"].to_pylist()[-1]


def test_gold_never_reaches_a_prompt(meld_dir):
    """Prompts for test are a function of predictions only: shuffling or dropping gold changes nothing."""
    from mer_ray.data.loaders import load_meld

    test = load_meld(meld_dir, "test")
    tpl = PromptTemplate.load()
    van = _toy_vanilla(test)
    assert not {"label", "sentiment"} & set(van.column_names)
    base = build_queries(van, tpl, [4, None], max_dialogues=8)["prompt"].to_pylist()
    # the same pipeline with the test gold shuffled: identical prompts
    shuffled = test["label"].to_pylist()
    random.Random(0).shuffle(shuffled)
    test2 = test.set_column(test.column_names.index("label"), "label", pa.array(shuffled))
    assert build_queries(_toy_vanilla(test2), tpl, [4, None], max_dialogues=8)["prompt"].to_pylist() == base
    # a table carrying gold columns is refused, not silently used
    leaky = van.append_column("label", test["label"]).replace_schema_metadata(van.schema.metadata)
    with pytest.raises(GoldLeakError):
        build_queries(leaky, tpl, [4])
    leaky = van.append_column("Emotion", test["label"]).replace_schema_metadata(van.schema.metadata)
    with pytest.raises(GoldLeakError):
        build_queries(leaky, tpl, [4])


def test_few_shot_comes_from_train_only(meld_dir):
    from mer_ray.data.loaders import load_meld

    train, dev = load_meld(meld_dir, "train"), load_meld(meld_dir, "dev")
    ex = few_shot_examples(train, 3, LABELS, seed=0)
    assert len(ex) == 3 and all(e["label"] in LABELS for e in ex)
    train_texts = set(train["text"].to_pylist())
    assert all(e["text"] in train_texts for e in ex)
    with pytest.raises(ValueError, match="train only"):
        few_shot_examples(dev, 3, LABELS)
    q = build_queries(_toy_vanilla(dev), PromptTemplate.load(), [None], examples=ex, max_dialogues=1)
    assert f'-> {ex[0]["label"]}' in q["prompt"].to_pylist()[0]


@pytest.mark.slow
def test_show_prompt_cli_uses_the_chat_template(meld_dir, tmp_path):
    from typer.testing import CliRunner

    from mer_ray.cli import app
    from mer_ray.data.loaders import load_meld

    path = tmp_path / "van.parquet"
    pq.write_table(_toy_vanilla(load_meld(meld_dir, "dev")), path)
    r = CliRunner().invoke(app, ["lantern", "show-prompt", "--vanilla", str(path), "--size", "whole", "--target", "1",
                                 "--model", "smollm2-135m-instruct"])
    assert r.exit_code == 0, r.output
    assert "<|im_start|>user" in r.stdout and r.stdout.rstrip().endswith("<|im_start|>assistant")
    assert "Target utterance: [2]" in r.stdout

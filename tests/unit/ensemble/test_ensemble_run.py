"""The ensemble run on synthetic members: fusion init, selection, no test-gold influence, output schema,
member alignment errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mer_ray.data.leak import GoldLeakError, assert_no_gold
from mer_ray.ensemble import combine as E
from mer_ray.ensemble.align import MemberError, align, split_keys
from mer_ray.ensemble.artifacts import read_ensemble_config, read_ensemble_weights
from mer_ray.ensemble.experiment import run_ensemble
from mer_ray.lantern.model import FEATURES, FusionConfig, build_fusion
from tests.unit.ensemble import synth

COLUMNS = ["dialogue_id", "turn", "probs_vanilla_seed0", "probs_vanilla_seed1", "probs_vanilla_seed2",
           "probs_vanilla_avg", "probs_lantern", "probs_oracle", "probs_fused_lantern", "probs_fused_oracle",
           "probs_ensemble"]


def _inputs(tmp, g, **kw):
    files = synth.write_inputs(tmp, g, **kw)
    from mer_ray.ensemble.experiment import load_lantern

    llm = load_lantern(files["lantern_dir"], synth.LABELS)[0] if files["lantern_dir"] else None
    out = {}
    for s in ("dev", "test"):
        keys = split_keys(g[s])
        van = {f"vanilla_seed{i}": align(d / f"predictions_{s}.parquet", s, keys, synth.LABELS)
               for i, d in enumerate(files["vanilla"])}
        mem = {"oracle": align(files["members"]["oracle"][s], s, keys, synth.LABELS)}
        y = np.array([synth.LABELS.index(g[s][k]) for k in keys])
        out[s] = E.SplitInputs(keys, van, mem, llm, y if s == "dev" else None)
    return out


def test_unfitted_fusion_over_all_members_is_the_vanilla_average(tmp_path):
    g = synth.gold(n_dialogues=6)
    dev = _inputs(tmp_path, g)["dev"]
    data = E.fusion_data(dev, lantern=True, members=["oracle"], calibrated=False)
    n, m_lantern = len(dev.keys), dev.lantern(False).llm.shape[1]
    assert data.llm.shape == (n, m_lantern + 1, synth.C)
    assert data.feats.shape == (n, m_lantern + 1, len(FEATURES) + 2)  # source block: lantern, oracle
    assert data.mask[:, -1].all()  # the member covers every utterance
    # source one-hot: lantern candidates [1, 0], the member [0, 1]; member fields are whole-dialogue
    assert torch.equal(data.feats[:, -1, -2:], torch.tensor([[0.0, 1.0]]).expand(n, 2))
    assert torch.equal(data.feats[:, 0, -2:], torch.tensor([[1.0, 0.0]]).expand(n, 2))
    assert (data.feats[:, -1, FEATURES.index("is_whole")] == 1).all()
    torch.manual_seed(0)
    model = build_fusion(FusionConfig(n_classes=synth.C, n_features=data.feats.shape[-1]))
    assert float(model.mix.detach()) == 0.0
    out = E.F.predict(model, data)
    np.testing.assert_allclose(out, dev.vanilla_avg, rtol=0, atol=1e-6)
    # with the mix opened the member moves the output: the check above is not vacuous
    with torch.no_grad():
        model.mix.fill_(1.0)
    assert np.abs(E.F.predict(model, data) - dev.vanilla_avg).max() > 1e-2
    # without extra members the inputs are Lantern's own, unchanged
    assert E.fusion_data(dev, lantern=True, members=[], calibrated=False) is dev.lantern(False)


def test_an_informative_member_is_selected_and_improves_heldout_dev(tmp_path):
    g = synth.gold(n_dialogues=30)
    inp = _inputs(tmp_path, g, member_quality=0.9, lantern_quality=None)
    res = E.fuse("fused_oracle", inp["dev"], inp["test"], synth.LABELS, lantern=False, members=["oracle"],
                 settings=synth.SETTINGS, k=5, seed=0)
    assert res.selected == "raw_short"  # calibrated settings are skipped without Lantern
    assert set(res.dev_heldout) == {"vanilla", "raw_short"}
    assert res.dev_heldout["raw_short"] > res.dev_heldout["vanilla"] + 10
    assert res.model is not None and res.sources == ["oracle"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run on synthetic data, and the same run with test gold shuffled."""
    root = tmp_path_factory.mktemp("ens")
    g = synth.gold(n_dialogues=24)
    files = synth.write_inputs(root / "in", g)
    a = run_ensemble(**files, meld_dir=None, out_dir=root / "a", wall_s={"caller": 1.5}, gold=g,
                     settings=synth.SETTINGS, n_boot=200)
    rng = np.random.default_rng(7)
    keys = list(g["test"])
    shuffled = {"dev": g["dev"], "test": dict(zip(keys, rng.permutation([g["test"][k] for k in keys])))}
    b = run_ensemble(**files, meld_dir=None, out_dir=root / "b", gold=shuffled, settings=synth.SETTINGS, n_boot=200)
    return root, g, a, b


def test_test_gold_never_influences_fitting(runs):
    root, _, a, b = runs
    ta, tb = pq.read_table(root / "a" / "test_predictions.parquet"), pq.read_table(root / "b" / "test_predictions.parquet")
    assert ta.equals(tb)  # every column, the ensemble's included, bit for bit
    assert a["selected"] == b["selected"]
    assert a["test"]["vanilla_avg"]["weighted_f1"] != b["test"]["vanilla_avg"]["weighted_f1"]  # the shuffle mattered
    assert pq.read_table(root / "a" / "dev_predictions.parquet").equals(pq.read_table(root / "b" / "dev_predictions.parquet"))


def test_prediction_tables_report_and_fusion_artifacts(runs):
    root, g, rep, _ = runs
    out = root / "a"
    for split in ("test", "dev"):
        t = pq.read_table(out / f"{split}_predictions.parquet")
        assert t.column_names == COLUMNS
        assert [c for c in t.column_names if c.startswith("probs_vanilla")] == COLUMNS[2:6]
        assert_no_gold(t, "test")
        keys = list(zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist()))
        assert len(keys) == len(set(keys)) and set(keys) == set(g[split])
        assert json.loads(t.schema.metadata[b"emotion_labels"]) == synth.LABELS
        p = np.asarray(t["probs_ensemble"].to_pylist())
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    r = json.loads((out / "report.json").read_text())
    assert r["labels"] == synth.LABELS
    for split in ("test", "dev"):
        assert set(r[split]) == {c[len("probs_"):] for c in COLUMNS[2:]}
        assert all(set(m) == {"weighted_f1", "accuracy", "macro_f1"} for m in r[split].values())
    for key in ("gain_vs_vanilla_mean", "gain_vs_vanilla_seed_avg"):
        lo, hi = r[key]["ci95"]
        assert lo <= r[key]["point"] <= hi and r[key]["n_boot"] == 200
    assert r["wall_s"]["caller"] == 1.5 and "ensemble_fit" in r["wall_s"]
    assert r["gold_past_labels_used"] is False and any("70.01" in n for n in r["notes"])
    assert set(r["selected"]) == {"fused_lantern", "fused_oracle", "ensemble"}
    assert r["test"]["ensemble"]["weighted_f1"] > r["vanilla_seed_mean"]["test"]["weighted_f1"] + 10
    assert (out / "ablation.png").stat().st_size > 1000 and "| ensemble |" in (out / "report.md").read_text()
    # the saved fusion reproduces probs_ensemble on test (what serving would load)
    cfg = read_ensemble_config(out / "fusion")
    assert cfg["selected"] == r["selected"]["ensemble"]["selected"] != "vanilla"
    assert cfg["sources"] == ["lantern", "oracle"] and cfg["features"][-2:] == ["source:lantern", "source:oracle"]
    model = build_fusion(FusionConfig(n_classes=len(cfg["labels"]), n_features=cfg["n_features"], hidden=cfg["setting"]["hidden"]))
    model.load_state_dict(read_ensemble_weights(out / "fusion"))
    inp = _inputs(root / "again", g)["test"]
    data = E.fusion_data(inp, cfg["lantern"], cfg["members"], cfg["calibrated"])
    t = pq.read_table(out / "test_predictions.parquet")
    np.testing.assert_allclose(E.F.predict(model.eval(), data), np.asarray(t["probs_ensemble"].to_pylist()), atol=1e-6)


def test_misaligned_members_are_refused_naming_the_file(tmp_path):
    g = synth.gold(n_dialogues=4)
    rng = np.random.default_rng(0)
    probs = synth.distributions(g["test"], 0.9, rng)
    keys = split_keys(g["test"])
    dropped = keys[3]
    short = synth.write_member(tmp_path / "short.parquet", {k: v for k, v in probs.items() if k != dropped}, "test")
    with pytest.raises(MemberError, match=r"short\.parquet.*misses 1 of") as e:
        align(short, "test", keys, synth.LABELS)
    assert repr(dropped) in str(e.value)
    other = synth.write_member(tmp_path / "labels.parquet", probs, "test", labels=["neutral", "joy", "sadness", "fear"])
    with pytest.raises(MemberError, match=r"labels\.parquet.*labels"):
        align(other, "test", keys, synth.LABELS)
    leak = synth.write_member(tmp_path / "leak.parquet", probs, "test", extra_cols={"label": ["joy"] * len(probs)})
    with pytest.raises(GoldLeakError, match="leak.parquet"):
        align(leak, "test", keys, synth.LABELS)
    # ids without the split prefix, rows shuffled, labels in another order: aligned by key and label name
    bare = {(k[0].split("/")[1], k[1]): v for k, v in probs.items()}
    order = list(bare)[::-1]
    ok = synth.write_member(tmp_path / "bare.parquet", bare, "test", labels=synth.LABELS[::-1], order=order)
    np.testing.assert_allclose(align(ok, "test", keys, synth.LABELS), np.stack([probs[k] for k in keys]), atol=1e-6)
    # one key order everywhere: dialogues grouped in numeric order, turns ascending
    assert split_keys([("test/10", 0), ("test/2", 4), ("test/2", 0)]) == [("test/2", 0), ("test/2", 4), ("test/10", 0)]

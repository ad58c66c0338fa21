"""Lantern's fusion over more members: extra LLM members as whole-dialogue candidates.

Lantern's :class:`~mer_ray.lantern.model.RFAttentionFusion` attends, per utterance,
over the vanilla distribution and LLM candidates. This module only changes its
inputs: each extra member (FARCER, ...) adds one candidate per utterance, with
the field features of a whole-dialogue field, and, when there are extra
members, every candidate's features get a one-hot *source* block (``lantern``,
then each member) so the attention can weigh members apart. The vanilla input
is the mean of the vanilla seeds; ``mix`` starts at 0, so an unfitted module is
the vanilla average, and an utterance without candidates falls back to it.
Without extra members the inputs are exactly Lantern's.

Fitting is Lantern's: k-fold cross-fitting over dev dialogues, selection by
held-out weighted F1 with vanilla-only among the candidates, refit on all of
dev, one prediction of test. Test gold never reaches this module.

Shapes: ``N`` utterances, ``M`` candidates, ``C`` labels, ``F`` features, ``S`` sources.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from mer_ray.lantern import fit as F
from mer_ray.lantern.model import FEATURES, RFAttentionFusion, candidate_features

SOURCE_LANTERN = "lantern"
Key = tuple[str, int]


@dataclass
class SplitInputs:
    """One split's aligned inputs (rows in the order of ``keys``)."""

    keys: list[Key]
    vanilla: dict[str, np.ndarray]  # seed name -> [N, C]
    members: dict[str, np.ndarray] = field(default_factory=dict)  # extra LLM member -> [N, C]
    llm: pa.Table | None = None  # Lantern prompt-job outputs (load_llm_outputs), or None
    y: np.ndarray | None = None  # [N] gold indices; dev only reaches fitting
    _lantern: dict = field(default_factory=dict, repr=False)  # calibrated -> FusionData cache

    @property
    def vanilla_avg(self) -> np.ndarray:
        """Mean of the vanilla seeds' distributions ``[N, C]``."""
        return np.mean(np.stack(list(self.vanilla.values())), axis=0)

    def lantern(self, calibrated: bool) -> F.FusionData:
        """Lantern's fusion inputs on this split (no LLM table: no candidates, ``M = 1`` masked)."""
        if calibrated not in self._lantern:
            van = pa.table({"dialogue_id": [k[0] for k in self.keys], "turn": [k[1] for k in self.keys],
                            "emotion_probs": self.vanilla_avg.astype(np.float32).tolist()})
            data = F.assemble(van, self.llm, calibrated=calibrated and self.llm is not None)
            if list(zip(data.dialogue_id, data.turn)) != list(self.keys):  # assemble groups by dialogue, sorts turns
                raise AssertionError("Lantern's assemble reordered utterances; keys must be dialogue-grouped, turn-sorted")
            self._lantern[calibrated] = data
        return self._lantern[calibrated]


def positions(dialogue_id: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each utterance's dialogue length and position ``[N]`` (rows dialogue-grouped, turn-sorted)."""
    ids = list(dialogue_id)
    length: dict[str, int] = {}
    pos = []
    for d in ids:
        pos.append(length.get(d, 0))
        length[d] = pos[-1] + 1
    return torch.tensor([length[d] for d in ids]), torch.tensor(pos)


def feature_names(sources: Sequence[str]) -> list[str]:
    """Per-candidate feature layout: Lantern's, then ``source:<name>`` for each source (none with one source)."""
    return list(FEATURES) + [f"source:{s}" for s in sources]


def sources_of(lantern: bool, members: Sequence[str]) -> list[str]:
    """The one-hot block's sources; empty (Lantern's own layout) when there are no extra members."""
    return ([SOURCE_LANTERN] if lantern else []) + list(members) if members else []


def with_members(data: F.FusionData, members: dict[str, np.ndarray], lantern: bool) -> F.FusionData:
    """Lantern's inputs plus one whole-dialogue candidate per utterance per extra member.

    Args:
        data: :func:`~mer_ray.lantern.fit.assemble` output (``llm [N, M, C]``).
        members: extra member name -> distributions ``[N, C]`` in ``data``'s row order.
        lantern: keep Lantern's candidates (False: drop them; they are all masked without an LLM table).

    Returns:
        Fusion inputs with ``M' = M + E`` candidates (``M' = E`` without Lantern) and features
        ``[N, M', len(FEATURES) + S]``; ``data`` itself when ``members`` is empty.
    """
    if not members:
        return data if lantern else dataclasses.replace(
            data, llm=data.llm[:, :0], mask=data.mask[:, :0], feats=data.feats[:, :0])
    sources = sources_of(lantern, list(members))
    n, s = data.vanilla.shape[0], len(sources)
    keep = data.llm.shape[1] if lantern else 0
    lan_block = torch.zeros(n, keep, s)
    if lantern:
        lan_block[..., 0] = 1.0  # masked candidates' features are ignored by the attention
    dlen, pos = positions(data.dialogue_id)
    probs = torch.stack([torch.as_tensor(members[m], dtype=torch.float32) for m in members], 1)  # [N, E, C]
    e = probs.shape[1]
    span = dlen[:, None].expand(n, e)  # a whole-dialogue field: span = dialogue length, rel = position
    feats = candidate_features(span, span, pos[:, None].expand(n, e), probs)
    block = torch.zeros(n, e, s)
    for j, m in enumerate(members):
        block[:, j, sources.index(m)] = 1.0
    return dataclasses.replace(
        data, llm=torch.cat([data.llm[:, :keep], probs], 1),
        mask=torch.cat([data.mask[:, :keep], torch.ones(n, e, dtype=torch.bool)], 1),
        feats=torch.cat([torch.cat([data.feats[:, :keep], lan_block], -1), torch.cat([feats, block], -1)], 1))


def fusion_data(inp: SplitInputs, lantern: bool, members: Sequence[str], calibrated: bool,
                with_gold: bool = False) -> F.FusionData:
    """Fusion inputs of one split for a set of members (``with_gold``: attach ``y`` for fitting)."""
    data = with_members(inp.lantern(calibrated and lantern), {m: inp.members[m] for m in members}, lantern)
    if with_gold:
        if inp.y is None:
            raise ValueError("fitting needs the split's gold labels")
        data = dataclasses.replace(data, y=torch.as_tensor(inp.y, dtype=torch.long))
    return data


@dataclass
class FusionResult:
    """One fused row of the ablation: the chosen setting, out-of-fold dev and test distributions."""

    name: str
    sources: list[str]  # the one-hot block's sources (empty: Lantern's layout)
    lantern: bool
    members: list[str]
    selected: str  # a setting name, or "vanilla"
    setting: dict
    dev_heldout: dict[str, float]  # setting -> held-out dev weighted F1 (%)
    dev_oof: np.ndarray  # [N_dev, C] out-of-fold predictions of the selected setting
    test: np.ndarray  # [N_test, C] the refit on all of dev, applied once
    model: RFAttentionFusion | None = None
    n_features: int = len(FEATURES)


def fuse(name: str, dev: SplitInputs, test: SplitInputs, labels: Sequence[str], lantern: bool,
         members: Sequence[str], settings: dict[str, dict], k: int = 5, seed: int = 0) -> FusionResult:
    """Cross-fit every setting on dev, select (vanilla included), refit on dev, predict test once.

    Args:
        name: the fused row's name (e.g. ``ensemble``).
        dev: dev inputs with ``y`` (the only gold used).
        test: test inputs; their ``y`` is never read.
        labels: label order (``C``).
        lantern: use Lantern's per-field candidates.
        members: extra members to add.
        settings: name -> ``{"calibrated": bool, **fit hyper-parameters}`` (Lantern's grid);
            calibrated settings are skipped without Lantern (calibration only applies to it).
        k: folds over dev dialogues.
        seed: fold and fitting seed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch fits and predictions: more threads only add contention
    try:
        return _fuse(name, dev, test, labels, lantern, members, settings, k, seed)
    finally:
        torch.set_num_threads(threads)


def _fuse(name, dev, test, labels, lantern, members, settings, k, seed) -> FusionResult:
    grid = {n: st for n, st in settings.items() if lantern or not st.get("calibrated", False)}
    heldout = {"vanilla": dev.vanilla_avg}
    for n, st in grid.items():
        hp = {a: b for a, b in st.items() if a != "calibrated"}
        data = fusion_data(dev, lantern, members, st.get("calibrated", False), with_gold=True)
        heldout[n] = F.cross_fit(data, {n: hp}, k=k, seed=seed)[n]
    chosen, metrics = F.select(heldout, dev.y, list(labels))
    n_feat = len(FEATURES) + len(sources_of(lantern, members))
    res = FusionResult(name, sources_of(lantern, members), lantern, list(members), chosen, dict(grid.get(chosen, {})),
                       {n: m["weighted_f1"] for n, m in metrics.items()}, heldout[chosen], test.vanilla_avg,
                       n_features=n_feat)
    if chosen != "vanilla":
        st = grid[chosen]
        hp = {a: b for a, b in st.items() if a != "calibrated"}
        model = F.fit(fusion_data(dev, lantern, members, st.get("calibrated", False), with_gold=True), seed=seed, **hp)
        res.model = model
        res.test = F.predict(model, fusion_data(test, lantern, members, st.get("calibrated", False)))
    return res


def lantern_alone(inp: SplitInputs) -> np.ndarray:
    """Lantern alone ``[N, C]``: mean LLM distribution over covering fields, vanilla average where none covers."""
    return inp.lantern(False).llm_only()


def lantern_coverage(inp: SplitInputs) -> float:
    """Share of utterances with at least one ok Lantern candidate."""
    return float(inp.lantern(False).mask.any(1).float().mean())

"""Robust feature scaling: the statistics are scikit-learn's, the torch module applies exactly them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mer_ray.features.scaling import CLIP, FeatureScaler, fit_scaling


def realistic(n=400, d=12, seed=0):
    """Columns like eGeMAPS: stds from 0.0075 to 175, means up to 2,700, plus one outlying row."""
    rng = np.random.default_rng(seed)
    std = np.logspace(np.log10(0.0075), np.log10(175), d)
    mean = np.linspace(0, 2700, d)
    x = rng.normal(mean, std, size=(n, d))
    x[0] = mean + 1e4 * std  # one broken clip
    return x.astype(np.float32), mean, std


def test_statistics_are_robust_scalers_and_ignore_missing_rows():
    from sklearn.preprocessing import RobustScaler

    x, _, std = realistic()
    with_missing = np.concatenate([x, np.full((50, x.shape[1]), np.nan, np.float32)])
    st = fit_scaling(with_missing)
    assert st["n"] == len(x)  # missing rows are not data
    rs = RobustScaler(unit_variance=True).fit(x.astype(np.float64))
    np.testing.assert_array_equal(np.float32(st["center"]), rs.center_.astype(np.float32))
    np.testing.assert_array_equal(np.float32(st["scale"]), rs.scale_.astype(np.float32))
    # IQR/1.349 estimates the std of normal data; the outlier barely moves it (a plain std would be ~500x)
    np.testing.assert_allclose(st["scale"], std, rtol=0.15)


def test_constant_and_mostly_constant_columns_get_a_usable_scale():
    x = np.zeros((100, 3), np.float32)
    x[:, 1] = 7.0  # constant: scale 1
    x[:90, 2], x[90:, 2] = 1.0, np.linspace(2, 50, 10)  # IQR 0 but it varies: its std
    st = fit_scaling(x)
    assert st["scale"][0] == 1.0 and st["scale"][1] == 1.0
    assert st["scale"][2] == pytest.approx(float(x[:, 2].std()), rel=1e-6)


def test_module_applies_the_statistics_and_clips():
    x, _, _ = realistic()
    st = fit_scaling(x)
    z = FeatureScaler(x.shape[1]).set_stats(st)(torch.from_numpy(x))
    want = np.clip((x - np.float32(st["center"])) / np.float32(st["scale"]), -CLIP, CLIP)
    np.testing.assert_array_equal(z.numpy(), want)  # the same float32 operations, elementwise
    assert float(z.abs().max()) == CLIP and abs(float(z[1:].median())) < 0.1


def test_identity_until_fitted_and_float32_statistics_survive_a_half_precision_model():
    s = FeatureScaler(2)
    x = torch.tensor([[2700.5, -3.25]])
    assert torch.equal(s(x), x)
    s.set_stats({"center": [2700.5, 0.0], "scale": [3.0, 1.0], "clip": 5.0})
    s.to(torch.bfloat16)
    assert s.center.dtype == torch.float32 and float(s.center[0]) == 2700.5  # bf16 would hold 2704
    assert float(s(x.to(torch.bfloat16))[0, 0]) == float(np.float32(3.5) / np.float32(3.0))  # the input is bf16 (2704); the statistics are not


def test_wrong_width_names_the_widths():
    with pytest.raises(ValueError, match=r"width \(3,\).*\(2,\)"):
        FeatureScaler(2).set_stats({"center": [0, 0, 0], "scale": [1, 1, 1]})

"""The extraction encoders on CUDA agree with the CPU (runs only where a GPU is; skipped elsewhere)."""

from __future__ import annotations

import pytest


@pytest.mark.gpu
def test_encoders_on_gpu():
    import numpy as np
    import torch

    from mer_ray.features.expression import ExpressionStage
    from mer_ray.features.text import TextStage

    crops = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    cpu = ExpressionStage(device="cpu")({"_crops": [crops.tobytes()]})
    # cuDNN convolutions default to TF32 (10-bit mantissa, ~1e-3 relative): compare true float32 kernels
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = ExpressionStage(device="cuda")({"_crops": [crops.tobytes()]})
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    # two float32 implementations (MKL-DNN, cuDNN): a margin not derived from the computation (not run here)
    np.testing.assert_allclose(cpu["face_probs"][0], gpu["face_probs"][0], atol=1e-4)
    emb = TextStage(device="cuda")({"text": ["hello there"]})["text_embedding"]
    assert len(emb[0]) == 384

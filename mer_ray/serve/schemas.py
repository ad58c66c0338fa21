"""Request and response bodies of the HTTP API (the field names are a contract).

Every request model forbids unknown fields, so ``{"video": "/etc/passwd"}`` is a
422 that names the field, and media can only arrive as base64 content: a value
that is not strict base64 (as every file path with a dot or of the wrong
length is) is refused with a message saying it looks like a path. The server
writes decoded bytes to its own temporary file; no request names a server file.
"""

from __future__ import annotations

import base64
import binascii
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mer_ray.data.labels import LABEL_SETS

_PATHLIKE = re.compile(r"^(?:/|\./|\.\./|~|[A-Za-z]:[\\/]|file:|[a-z][a-z0-9+.-]*://)|\.(?:mp4|mkv|avi|mov|webm|wav|mp3|flac|ogg|m4a)$", re.I)
SESSION_ID = r"^[A-Za-z0-9_.:-]{1,64}$"


def decode_media(value: str, field: str) -> bytes:
    """Strictly decode base64 ``value``; the error names ``field`` and says when it looks like a path."""
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        if _PATHLIKE.search(value.strip()):
            raise ValueError(f"{field} looks like a file path ({value[:80]!r}); media must be sent as base64-encoded content, never as a path") from None
        raise ValueError(f"{field} is not valid base64 content") from None
    if not data:
        raise ValueError(f"{field} is empty")
    return data


class Utterance(BaseModel):
    """One turn of a dialogue. Media are optional and sent as base64 content."""

    model_config = ConfigDict(extra="forbid")

    speaker: str = Field(..., max_length=200, description="Speaker name or id; turns by the same speaker share it.")
    text: str = Field(..., description="Transcript of the utterance (may be empty when media are sent).")
    video_b64: str | None = Field(None, description="Base64 of a video clip of the utterance (any container PyAV reads).")
    audio_b64: str | None = Field(None, description="Base64 of an audio clip of the utterance.")

    @field_validator("video_b64", "audio_b64")
    @classmethod
    def _media_is_content(cls, v: str | None, info) -> str | None:
        if v is not None:
            decode_media(v, info.field_name)
        return v


class _Options(BaseModel):
    label_set: str | None = Field(None, description="Label set of the answer; default: the model's own. Others need a written-down mapping.")
    use_llm: bool = Field(True, description="False skips the LLM member (vanilla model only, low latency).")
    alpha: float | None = Field(
        None, gt=0, lt=1,
        description="Miscoverage of the prediction sets: each set holds the true label with probability >= 1 - alpha. "
                    "Default: the calibration's alpha_default; outside the calibration's alpha_range the request is a 422 "
                    "naming the range. Ignored (the answer says alpha: null) when the models dir has no calibration.")
    model: str | None = Field(
        None, max_length=200,
        description="A fine-tuned adapter to answer with (GET /v1/labels lists them under adapters), instead of the ensemble; "
                    "the serve_multiplexed_model_id header names one too (both given: they must agree). The adapter alone "
                    "answers, in its own label set (label_set may name one mapped from it); use_llm and alpha do not apply. "
                    "Unknown, or adapters not enabled: 422. In a session the adapter is fixed by its first turn.")

    @field_validator("label_set")
    @classmethod
    def _known_label_set(cls, v: str | None) -> str | None:
        if v is not None and v not in LABEL_SETS:
            raise ValueError(f"unknown label set {v!r}; known: {sorted(LABEL_SETS)}")
        return v


class RecognizeRequest(_Options):
    """``POST /v1/recognize``: one dialogue."""

    model_config = ConfigDict(extra="forbid")

    utterances: list[Utterance] = Field(..., min_length=1, description="The dialogue's turns, in order (at least one).")


class BatchRequest(BaseModel):
    """``POST /v1/recognize:batch``: several dialogues, each with its own options."""

    model_config = ConfigDict(extra="forbid")

    dialogues: list[RecognizeRequest] = Field(..., min_length=1, description="The dialogues (at least one), each a /v1/recognize request.")


class TurnRequest(_Options):
    """``POST /v1/sessions/{session_id}/turns``: the next turn of a streamed dialogue."""

    model_config = ConfigDict(extra="forbid")

    utterance: Utterance = Field(..., description="The new turn; earlier turns of the session are its context.")
    expected_turn: int | None = Field(
        None, ge=0,
        description="The turn number this request is (0 for a new session). A retry of a stored turn (same number, same "
                    "request) gets the stored answer back, never a second turn; any other mismatch, or a session closed "
                    "by DELETE or expiry, is a 409 whose body says next_turn. Without it a turn is appended as is, so a "
                    "retried request may be stored twice.")


Dist = dict[str, float]


class UtterancePrediction(BaseModel):
    """One utterance's answer: the calibrated distribution, its members and its prediction set."""

    label: str = Field(..., description="Argmax of ``probs`` (calibration never changes it: it is also the argmax of ``probs_uncalibrated``).")
    probs: Dist = Field(..., description="The ensemble's final distribution, calibrated (temperature scaling fitted on dev) when the "
                                         "models dir has a calibration; sums to 1.")
    probs_uncalibrated: Dist = Field(..., description="The same distribution before calibration (equal to ``probs`` without one).")
    prediction_set: list[str] | None = Field(
        None, description="Split-conformal prediction set at miscoverage ``alpha``: labels ordered by ``probs``, never empty, always "
                          "holding ``label``; null when the models dir has no conformal scores for this use_llm value and label set.")
    vanilla: Dist | None = Field(..., description="The vanilla model's distribution (calibrated with its own temperature when there is "
                                                  "one); null when an adapter answered (``model`` is set).")
    llm: Dist | None = Field(None, description="The LLM refiner's distribution (mean over its receptive fields, calibrated with its own "
                                               "temperature when there is one); null when the LLM was skipped.")
    receptive_fields: list[list[int]] = Field(
        default_factory=list, description="[first_turn, last_turn] (inclusive, 0-based positions) of each field the LLM saw for this turn."
    )
    mllm: Dist | None = Field(None, description="The fine-tuned multimodal LLM's distribution (calibrated with its own temperature when "
                                                "there is one), when that member is deployed.")


class ConformalInfo(BaseModel):
    """How the prediction sets were made."""

    method: str = Field(..., description="Split-conformal score rule: ``lac`` (marginal) or ``class_conditional_lac`` (per gold label).")
    alpha_range: tuple[float, float] = Field(..., description="[low, high]: the alphas a request may ask for.")


def _calibrated():
    return Field(..., description="Whether the models dir has a calibration (``calibration.json``; for an adapter's answer, the "
                                  "adapter's own directory); false: ``probs`` equals ``probs_uncalibrated`` and every "
                                  "``prediction_set`` is null.")


def _model():
    return Field(None, description="The adapter that answered (its name), or null: the ensemble answered.")


def _alpha():
    return Field(None, description="The miscoverage the prediction sets were made at (the request's, else the calibration's default); "
                                   "null when no set was made (no calibration, or no conformal scores for this use_llm / label set).")


def _conformal():
    return Field(None, description="The conformal method and supported alpha range; null exactly when ``alpha`` is null.")


class RecognizeResponse(BaseModel):
    label_set: str = Field(..., description="The label set of every distribution in the answer.")
    labels: list[str] = Field(..., description="That label set's labels, in order.")
    utterances: list[UtterancePrediction] = Field(..., description="One answer per request utterance, in order.")
    model: str | None = _model()
    calibrated: bool = _calibrated()
    alpha: float | None = _alpha()
    conformal: ConformalInfo | None = _conformal()
    timing_ms: dict[str, float] = Field(..., description="Wall milliseconds per member, and ``total``.")


class BatchResponse(BaseModel):
    results: list[RecognizeResponse] = Field(..., description="One answer per dialogue, in the request's order.")


class SpeakerSummary(BaseModel):
    """One speaker's last turns (at most 5, this one included) answered in the response's label set."""

    turns: list[int] = Field(..., description="Their 0-based turn numbers in the session, oldest first.")
    labels: list[str] = Field(..., description="The label predicted for each of those turns when it arrived.")
    mean_probs: Dist = Field(..., description="The mean of those turns' ``probs`` (calibrated when the models dir is).")


class TurnResponse(BaseModel):
    session_id: str = Field(..., description="The session, as in the path.")
    turn: int = Field(..., description="0-based position of this turn in the session.")
    n_context: int = Field(..., description="Turns (this one included) the prediction used as context.")
    label_set: str = Field(..., description="The label set of every distribution in the answer.")
    labels: list[str] = Field(..., description="That label set's labels, in order.")
    utterance: UtterancePrediction = Field(..., description="This turn's answer.")
    model: str | None = _model()
    speakers: dict[str, SpeakerSummary] = Field(
        ..., description="Per speaker of the kept turns: their last 5 turns answered in this label set, this one included.")
    calibrated: bool = _calibrated()
    alpha: float | None = _alpha()
    conformal: ConformalInfo | None = _conformal()
    timing_ms: dict[str, float] = Field(..., description="Wall milliseconds per member, and ``total``.")


class LabelsResponse(BaseModel):
    model_label_set: str = Field(..., description="The label set the deployed models predict.")
    label_sets: dict[str, list[str]] = Field(..., description="Every label set a request may name, with its labels.")
    available: list[str] = Field(..., description="Label sets this deployment can answer in (the model's, and those with a mapping from it).")
    adapters: dict[str, str] = Field(default_factory=dict, description="Installed fine-tuned adapters a request may name (``model``): "
                                                                       "name -> its label set; {} when adapters are not enabled.")

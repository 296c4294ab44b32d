"""The shapes of every answer, as pydantic models: they are the OpenAPI schema of the API."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: str = Field(description="a stable machine-readable code, e.g. not_an_image, unknown_label")
    message: str = Field(description="what was wrong, for people")
    accepted: list[str] | None = Field(None, description="the accepted values, where a value was not one of them")


class Prediction(BaseModel):
    """One task's answer for one image or face."""

    prediction_id: str | None = Field(description="name it in POST /feedback to correct this answer; null when the feedback store's "
                                      "database could not record it (an outage): send the image with the feedback instead")
    label: str
    confidence: float = Field(description="the top probability")
    probabilities: dict[str, float] = Field(description="every label of the task, in the model's order")
    task: str
    backbone_version: str
    head_version: str


class Answer(Prediction):
    """The default task's answer at the top level (single-task clients), every task's under ``tasks``."""

    tasks: dict[str, Prediction]
    box: list[int] | None = Field(None, description="the face's box (x, y, w, h) in the image's pixels, for a face")
    detector_score: float | None = Field(None, description="the face detector's score, for a face")


class FacesAnswer(BaseModel):
    """faces=true: every face found, each with its box; "no face found" is a normal answer."""

    face_count: int
    faces: list[Answer]
    whole_image: Answer | None = Field(description="the whole image's answer when no face was found (unless whole_image_if_no_face=false)")
    message: str | None


class ItemError(ErrorBody):
    """An item of a batch that could not be answered; the other items are."""

    index: int = Field(description="the item's position among the images sent (multipart files first, then images_base64)")


class BatchAnswer(BaseModel):
    predictions: list[Answer | FacesAnswer | ItemError] = Field(description="one entry per image sent, in order")


class Aggregate(BaseModel):
    mean: dict[str, float]
    mean_label: str
    ema: dict[str, float] = Field(description="exponential moving average over frames (recent frames weigh more)")
    ema_label: str
    ema_alpha: float


class Clip(BaseModel):
    aggregate: Aggregate
    task: str
    backbone_version: str
    head_version: str


class Frame(Answer):
    index: int | None = Field(None, description="the frame's position among the frames sent")
    time_s: float | None = Field(None, description="the frame's time in the video")


class SequenceAnswer(Clip):
    frame_count: int
    frames: list[Frame]
    tasks: dict[str, Clip]


class FeedbackAck(BaseModel):
    """Sent once the item is committed: it will not be lost."""

    feedback_id: str
    queue_depth: int = Field(description="items of this task waiting for the next update")
    duplicate: bool = Field(description="true when this idempotency key was already acknowledged (nothing new stored)")
    label: str
    task: str


class UpdateAnswer(BaseModel):
    task: str
    head_version: str
    parent_version: str
    promoted: bool
    verdict: str
    new_items: int = Field(description="feedback items this update was the first to use")
    feedback_items: int = Field(description="all feedback the candidate was taught, and the gate's evidence")
    left_out_items: int = Field(description="queued items that could not be used (an old backbone's embedding without an image)")
    seconds: float
    metrics: dict[str, float]
    gate_codes: list[str] = Field(default=[], description="why the gate refused it, machine-readable: validation_drop, "
                                  "too_little_evidence, no_evidence, answers_worse (empty when promoted)")


class RollbackAnswer(BaseModel):
    task: str
    head_version: str = Field(description="the head version that is champion now")
    rolled_back_version: str = Field(description="the head version that was champion before")

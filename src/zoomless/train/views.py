"""A step's prompts: each sample rendered in the student's view (and the teacher's, for a recipe
with one) and encoded, the next batch's prepared in the background during this step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from zoomless.engines.base import Conversation
from zoomless.sample import Sample
from zoomless.train.batching import PromptEncoding, encode_prompt

if TYPE_CHECKING:
    from zoomless.train.common import Run


def view_conversation(
    sample: Sample, view: str, form: str, *, max_pixels: int | None, crop_margin: float, zoom: float
) -> Conversation:
    """The single-turn conversation a model sees for one view of a sample."""
    from zoomless.engines.base import conversation
    from zoomless.imaging import render_view
    from zoomless.prompts import format_question

    image, question = render_view(sample, view, crop_margin=crop_margin, zoom=zoom, max_pixels=max_pixels)
    return conversation([image], format_question(sample, question, form))


@dataclass
class StepPrompts:
    """A batch's prompts: each sample in the student's view (the conversation the rollout engine
    samples under, and its encoding) and, where the recipe has a teacher, encoded in the teacher's view."""

    conversations: list[Conversation]
    student: list[PromptEncoding]
    teacher: list[PromptEncoding] | None


def encode_views(
    processor: Any, samples: Sequence[Sample], student_view: str, teacher_view: str | None, view: dict[str, Any]
) -> StepPrompts:
    """Render and encode a batch's views (`view`: `view_conversation`'s keyword arguments). Pure:
    no random draws, the same prompts on any thread."""
    conversations = [view_conversation(s, student_view, **view) for s in samples]
    student = [encode_prompt(processor, c) for c in conversations]
    teacher = None
    if teacher_view is not None:
        teacher = [encode_prompt(processor, view_conversation(s, teacher_view, **view)) for s in samples]
    return StepPrompts(conversations, student, teacher)


def step_prompts(
    run: "Run", indices: Sequence[int], student_view: str, teacher_view: str | None, view: dict[str, Any],
    ahead: bool = True, probes_these_views: bool = False,
) -> StepPrompts:
    """The prompts of this step's batch (`indices`, from `run.data.next_batch()`), and, with `ahead`,
    the next batch's started in the background (`run.prefetch`): they need no weights, so rendering
    and encoding them overlaps this step's rollout, forwards and backwards. The prefetch is a cache
    keyed by the indices and the views: what comes back is what `encode_views` gives here.
    `probes_these_views`: the data's first-draw probe renders exactly these views, so a batch
    prepared ahead without error is vouched for (`ScreenedData.vouch`) and not rendered again."""
    views = (student_view, teacher_view, tuple(sorted(view.items())))
    vouch = getattr(run.data, "vouch", None) if probes_these_views else None

    def prepare(batch: Sequence[int], processor: Any) -> Callable[[], StepPrompts]:
        def job() -> StepPrompts:
            prompts = encode_views(processor, [run.samples[i] for i in batch], student_view, teacher_view, view)
            if vouch is not None:
                vouch(batch)
            return prompts

        return job

    prompts = run.prefetch.get((views, tuple(indices)), prepare(indices, run.processor))
    if ahead:
        upcoming = run.data.peek_batch()
        run.prefetch.ahead((views, tuple(upcoming)), prepare(upcoming, run.worker_processor))
    return prompts

"""What flows between the stages: a region of an image, then a question about it that gathers
its answer, options and difficulty as it goes. Keys are content: (image SHA-1, box, question)."""

from __future__ import annotations

from dataclasses import dataclass

from zoomless.synth.intake import ImageInfo
from zoomless.synth.parsing import short_hash


@dataclass(frozen=True)
class Region:
    image: ImageInfo
    box: tuple[int, int, int, int]  # original pixels
    label: str | None = None
    score: float | None = None

    @property
    def key(self) -> str:
        return f"{self.image.sha1}:{','.join(map(str, self.box))}"

    @property
    def file_stem(self) -> str:
        return f"{self.image.sha1[:16]}_{'_'.join(map(str, self.box))}"


@dataclass(frozen=True)
class Item:
    region: Region
    question: str
    dimension: str | None = None
    answers: tuple[str | None, ...] = ()  # every teacher sample's extracted answer, in teacher order
    votes: int = 0
    total: int = 0
    answer: str | None = None  # a teacher's own answer that won the consensus
    options: tuple[str, ...] | None = None
    letter: str | None = None
    problem: str | None = None  # the distilled question text (pointing sentence, options)
    student_correct: int | None = None
    student_samples: int | None = None

    @property
    def key(self) -> str:
        return f"{self.region.key}:{short_hash(self.question)}"

    @property
    def sample_id(self) -> str:
        return f"r2i-{short_hash(self.key)}"

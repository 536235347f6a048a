"""Bad samples and the `on_bad_sample` policy ("stop" or "skip"), for every recipe.

A sample is bad when a view it is trained on cannot be made: no box (and no teacher image) for a
view that needs one, no gold answer to train on, an image that is missing, empty, not an image or
corrupt. Two cheap checks find them:
  - before training (`screen_samples`): the recipe's own check of each record (boxes, answers) and
    each image's header (the file exists and is an image);
  - the first time a sample is drawn into a batch (`ScreenedData`): the recipe's views of it are
    rendered once, so pixels that cannot be decoded show up before the step uses them.
"stop" raises `BadSampleError`: one line naming the data file, the sample id and what is wrong.
"skip" writes the same to `out_dir/bad_samples.jsonl` and the log, counts it (the `bad_samples`
metric) and never draws the sample again; the batch is topped up from the data order, so it keeps
its size. The bad set is part of the data-order state saved in checkpoints, so a resumed run skips
exactly what the straight run skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from zoomless.imaging import ImageError, _open, load_image
from zoomless.sample import ImageRef, Sample, read_samples
from zoomless.train.data import DataIterator

BAD_SAMPLES_FILE = "bad_samples.jsonl"
Policy = Literal["stop", "skip"]
log = logging.getLogger("zoomless.train")


class BadSampleError(ValueError):
    """A sample that cannot be trained on under on_bad_sample: stop (one line: file, id, reason)."""


@dataclass(frozen=True)
class BadSample:
    index: int  # position in the run's sample list
    id: str
    source: str  # the data file it came from
    reason: str

    def line(self) -> str:
        return f"{self.source}: sample {self.id}: {self.reason}"


def read_training_samples(paths: Sequence[str | Path]) -> tuple[list[Sample], list[str]]:
    """All samples of the data files, and the file each one came from."""
    samples: list[Sample] = []
    sources: list[str] = []
    for p in paths:
        part = read_samples(p)
        samples.extend(part)
        sources.extend([str(p)] * len(part))
    if not samples:
        raise ValueError(f"{', '.join(str(p) for p in paths)}: no samples to train on")
    return samples, sources


# ----------------------------------------------------------------------------- checks


def _ref_name(ref: ImageRef) -> str:
    return ref if isinstance(ref, str) else "<bytes>"


def reason_of(error: Exception, sample: Sample) -> str:
    """The error's message on one line, without the sample id its raiser put in front; an image
    error (rendering names images by sample id) names the image file instead: "image PATH: ..."."""
    msg = " ".join(str(error).split())
    named = ((f"{sample.id} (teacher_image): ", "teacher_image", sample.teacher_image),
             (f"sample {sample.id}: ", None, None), (f"{sample.id}: ", "image", sample.image))
    for prefix, label, ref in named:
        if not msg.startswith(prefix):
            continue
        msg = msg[len(prefix):]
        if isinstance(error, ImageError) and ref is not None:
            name = _ref_name(ref)
            msg = f"{label} {name}: {msg.replace(' ' + name, '')}"
        return msg
    return msg


def check_image_header(sample: Sample) -> None:
    """Raise ImageError unless the sample's image exists and has a readable image header (no decoding)."""
    name = _ref_name(sample.image)
    try:
        _open(sample.image, name).close()
    except ImageError as e:
        raise ImageError(f"image {e}") from None


def decode_image(sample: Sample) -> None:
    """Raise ImageError unless the sample's image decodes in full (the default first-draw probe)."""
    try:
        load_image(sample.image, name=_ref_name(sample.image))
    except ImageError as e:
        raise ImageError(f"image {e}") from None


# ----------------------------------------------------------------------------- the policy


class SampleScreen:
    """Applies the policy to bad samples: raise (stop), or record, log and remember them (skip)."""

    def __init__(self, policy: Policy, sources: Sequence[str], log_path: Path | None) -> None:
        self.policy = policy
        self.sources = list(sources)
        self.log_path = log_path
        self.bad: dict[int, BadSample] = {}

    def record(self, index: int, sample: Sample, reason: str) -> BadSample:
        bad = BadSample(index, sample.id, self.sources[index], reason)
        if index not in self.bad:
            self.bad[index] = bad
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with self.log_path.open("a") as f:
                    f.write(json.dumps(asdict(bad)) + "\n")
        return bad

    def report(self, index: int, sample: Sample, error: Exception) -> None:
        """A sample failed: raise under "stop"; log it and remember it under "skip"."""
        bad = self.record(index, sample, reason_of(error, sample))
        if self.policy == "stop":
            raise BadSampleError(f"{bad.line()} (on_bad_sample: skip would train without it)")
        log.warning("skipping bad sample: %s", bad.line())

    def restore(self, entries: Sequence[dict[str, Any]]) -> None:
        """Bad samples found before a checkpoint (resume); the log keeps only those."""
        self.bad = {int(e["index"]): BadSample(**e) for e in entries}
        if self.log_path is not None:
            self.log_path.write_text("".join(json.dumps(asdict(b)) + "\n" for b in self.bad.values()))


class ScreenedData(DataIterator):
    """The data order of `DataIterator`, minus bad samples: each sample is probed the first time it
    is drawn; a bad one is handled by the screen and replaced by the next index in the order."""

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int, screen: SampleScreen) -> None:
        super().__init__(len(samples), batch_size, seed)
        self.samples = samples
        self.screen = screen
        self.probe: Callable[[Sample], Any] = decode_image
        # optional: probe many samples at once (e.g. in data workers), True for each one that passed;
        # a failed one is probed again here, so that reporting has one code path
        self.probe_many: Callable[[list[Sample]], list[bool]] | None = None
        self.good: set[int] = set()  # probed this process; not saved (probing again is cheap)

    def vouch(self, indices: Sequence[int]) -> None:
        """These samples were just rendered without error in the views the probe renders (the
        recipe's prefetch, in its worker thread: a set update is atomic there): no probe on their
        first draw, which would render them again on the step's critical path."""
        self.good.update(indices)

    def _probe_new(self, indices: Sequence[int]) -> None:
        new = [i for i in dict.fromkeys(indices) if i not in self.good and i not in self.screen.bad]
        if new and self.probe_many is not None:
            self.good.update(i for i, ok in zip(new, self.probe_many([self.samples[i] for i in new])) if ok)

    def _usable(self, i: int) -> bool:
        if i in self.screen.bad:
            return False
        if i not in self.good:
            try:
                self.probe(self.samples[i])
            except (ValueError, OSError) as e:  # ImageError, SampleError: bad data, not a bug here
                self.screen.report(i, self.samples[i], e)
                return False
            self.good.add(i)
        return True

    def global_batch(self) -> list[int]:
        # every process screens the whole global batch, so all of them top it up the same way
        first = super().global_batch()
        self._probe_new(first)
        batch = [i for i in first if self._usable(i)]
        while len(batch) < self.batch_size:
            if len(self.screen.bad) >= self.n_items:
                raise BadSampleError(f"all {self.n_items} samples are bad; see {self.screen.log_path}")
            batch.extend(i for i in self.take(self.batch_size - len(batch)) if self._usable(i))
        return batch

    def peek_global_batch(self) -> list[int]:
        # `global_batch` as it will be if the samples not probed yet pass (probing here would report a
        # bad one a step early). A sample found bad meanwhile makes it a wrong guess, which only costs
        # the prefetch keyed by it (train/prefetch.py).
        batch: list[int] = []
        with self.state_kept():
            while len(batch) < self.batch_size and len(self.screen.bad) < self.n_items:
                batch.extend(i for i in self.take(self.batch_size - len(batch)) if i not in self.screen.bad)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bad": [asdict(b) for b in self.screen.bad.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.screen.restore(state.get("bad", []))


def make_data(
    cfg: Any, samples: Sequence[Sample], sources: Sequence[str], resume: bool, main: bool = True
) -> ScreenedData:
    """The run's screened data order; a fresh run starts a fresh bad-sample log. Only the main
    process (`main`) writes the log; the others find the same bad samples and keep them in memory."""
    path = Path(cfg.out_dir) / BAD_SAMPLES_FILE
    if main and not resume:
        path.unlink(missing_ok=True)
    screen = SampleScreen(cfg.on_bad_sample, sources, path if main else None)
    return ScreenedData(samples, cfg.batch_size, cfg.seed, screen)


def screen_samples(
    run: Any, check: Callable[[Sample], Any] | None = None, probe: Callable[[Sample], Any] | None = None
) -> None:
    """Before training: screen every sample with the recipe's `check` (it raises ValueError naming
    what is wrong) and its image header, and install `probe` (render the recipe's views of a sample)
    for the first draw of each sample. Under "stop" every bad sample is logged first, then the
    first one raises."""
    data: ScreenedData = run.data
    if probe is not None:
        data.probe = probe
    screen = data.screen
    found: list[BadSample] = []
    for i, s in enumerate(run.samples):
        if i in screen.bad:
            continue
        try:
            if check is not None:
                check(s)
            check_image_header(s)
        except (ValueError, OSError) as e:
            found.append(screen.record(i, s, reason_of(e, s)))
            if screen.policy == "skip":
                log.warning("skipping bad sample: %s", found[-1].line())
    if found and screen.policy == "stop":
        more = f"; {len(found) - 1} more in {screen.log_path}" if len(found) > 1 else ""
        raise BadSampleError(f"{found[0].line()}{more} (on_bad_sample: skip would train without them)")

"""`zoomless synth`: R2I data synthesis, stage by stage, resumable at any moment.

    intake -> regions -> filters -> crop+zoom -> questions -> validation -> teacher answers
           -> consensus -> distillation (overlay, MCQ) -> difficulty -> export

How a run goes: the images of this shard are taken in waves; within a wave each stage asks its
model for every item whose reply is not in the store yet (in batches of `chunk_size`, each item
with a seed fixed by its content) and appends the replies durably. The store holds only what
the models said; parsing, filters and the consensus are pure functions of it, recomputed on
every pass. So a run killed at any moment and started again makes exactly the calls that are
missing and ends with the same output as an uninterrupted run; changing a threshold needs no call.

At the end one pass over all images, with no calls, yields the funnel (funnel.json, funnel.md)
and the export (samples.parquet, easyr1.parquet, vision_opd.parquet).

Failed calls (after the engine's bounded retries) are not stored: the item stays pending and the
next run retries it. If every request of a batch fails, the endpoint is down or misconfigured:
the run stops with a message that names the role and the URL, after writing the funnel.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image

from zoomless.engines.base import Conversation, conversation
from zoomless.imaging import ImageError, budget_size, crop_view, load_image, zoom_view
from zoomless.synth import answers as ans
from zoomless.synth import difficulty as diff
from zoomless.synth import distill as dst
from zoomless.synth import questions as qs
from zoomless.synth import regions as rg
from zoomless.synth.config import SynthConfig, SynthConfigError, SynthError, load_synth_config, parse_overrides
from zoomless.synth.export import Views, export
from zoomless.synth.funnel import Funnel, usage_by_role, write_report
from zoomless.synth.intake import ImageInfo, intake
from zoomless.synth.items import Item, Region
from zoomless.synth.parsing import clip, seed_of, short_hash
from zoomless.synth.roles import Roles
from zoomless.synth.store import Store
from zoomless.synth.validate import VERDICTS, parse_verdict, validation_conversation

log = logging.getLogger("zoomless.synth")


def batched(items: Sequence, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


class LRU(OrderedDict):
    """A small cache of decoded images, so a wave does not decode the same picture again and again."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class Progress:
    """A rich progress bar on stderr (images, and the calls of the current stage), or nothing."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=Console(stderr=True))

    def __enter__(self) -> "Progress":
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int) -> Any:
        return None if self.bar is None else self.bar.add_task(description, total=total)

    def advance(self, task: Any, n: int = 1) -> None:
        if self.bar is not None and task is not None:
            self.bar.advance(task, n)

    def done(self, task: Any) -> None:
        if self.bar is not None and task is not None:
            self.bar.remove_task(task)


@dataclass
class Job:
    """One model call: its store key, how to build its conversation, its seed, what to store with it."""

    key: str
    build: Callable[[], Conversation]
    seed: int
    info: dict


def ask(key: str, pictures: Callable[[], list[Image.Image]], text: str, seed: int, **info: Any) -> Job:
    """A job for one user turn: the pictures (decoded only when the batch is sent), then the text."""
    return Job(key, lambda: conversation(pictures(), text), seed, info)


# Errors that belong to one request (its image or text), not to the endpoint.
_ITEM_ERRORS = ("HTTP 400", "HTTP 413", "HTTP 422")


def _endpoint_failing(errors: list[str]) -> bool:
    """Whether a batch whose every request failed means the endpoint is down or misconfigured
    (connection errors, timeouts, 5xx, 401/404 ...), rather than a few requests it rejected."""
    return len(errors) >= 3 or not all(e.startswith(_ITEM_ERRORS) for e in errors)


class Run:
    """The state of one `run_synth` call: config, store, roles, image caches, this run's failures."""

    def __init__(self, cfg: SynthConfig, progress: Progress):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.store = Store(self.out / "store", cfg.shard_index)
        self.roles = Roles(cfg)
        self.progress = progress
        self.failed: dict[str, dict[str, str]] = defaultdict(dict)  # stage -> key -> error
        self.boxes = None
        if cfg.regions.backend == "boxes":
            if cfg.regions.boxes_file is None:
                raise SynthError("regions.boxes_file: the boxes backend needs a JSONL file of boxes")
            self.boxes = rg.load_boxes(cfg.regions.boxes_file)
        self.seeds = qs.load_seeds(cfg.questions.seeds_file)
        self._full, self._crops, self._overlays = LRU(4), LRU(16), LRU(4)

    # -- pictures

    def full(self, image: ImageInfo) -> Image.Image:
        return self._full.get_or(image.sha1, lambda: load_image(image.path, max_pixels=self.cfg.intake.max_pixels))

    def crop(self, region: Region) -> Image.Image:
        def make() -> Image.Image:
            c = self.cfg.crop
            piece, _ = crop_view(self.full(region.image), region.box, margin=c.margin, min_side=c.min_side)
            return zoom_view(piece, c.zoom)

        return self._crops.get_or(region.key, make)

    def overlay(self, region: Region) -> Image.Image:
        d = self.cfg.distill
        return self._overlays.get_or(
            region.key, lambda: dst.overlay(self.full(region.image), region.box, d.overlay_margin, d.overlay_width))

    # -- model calls

    def ensure(self, stage: str, role: str, jobs: list[Job], n: int = 1) -> None:
        """Ask `role` for every job whose replies are not stored yet, and store them."""
        pending = [j for j in jobs if not self.store.has(stage, j.key)]
        if not pending:
            return
        client = self.roles.get(role)
        task = self.progress.task(f"{stage} ({role})", len(pending))
        try:
            for chunk in batched(pending, self.cfg.chunk_size):
                self._ask(stage, role, client, chunk, n)
                self.progress.advance(task, len(chunk))
        finally:
            self.progress.done(task)

    def _ask(self, stage: str, role: str, client: Any, chunk: list[Job], n: int) -> None:
        """One batch: build the conversations, generate, store what came back, log the usage."""
        ready, convs, errors = [], [], []
        for job in chunk:
            try:
                convs.append(job.build())
                ready.append(job)
            except ImageError as e:  # the file changed or vanished since intake: this item only
                self.failed[stage][job.key] = f"image: {e}"
        results = client.generate(convs, [j.seed for j in ready], n) if ready else []
        done = []
        for job, gens in zip(ready, results):
            error = next((g.error or "error" for g in gens if g.error or g.finish_reason == "error"), None)
            if error is not None:
                self.failed[stage][job.key] = error
                errors.append(error)
            else:
                model = client.endpoint.model or str(client.endpoint.model_dir)
                replies = [clip(g.text, self.cfg.max_reply_chars) for g in gens]
                done.append((job.key, {**job.info, "role": role, "model": model, "replies": replies}))
        self.store.put(stage, done)
        usage = client.usage_delta()
        if any(usage.values()):
            self.store.log("usage", {"role": role, **usage})
        if errors and not done and _endpoint_failing(errors):
            raise SynthError(
                f"{stage}: all {len(errors)} requests of the last batch to {client.path} ({client.where}) "
                f"failed: {errors[0]}. Everything finished so far is saved in {self.store.root}; "
                "fix the endpoint and rerun to resume.")

    def missing(self, funnel: Funnel, stage: str, keys: Iterable[str]) -> None:
        """Count an item whose reply is not stored: failed in this run, or not reached yet."""
        errors = [self.failed[stage].get(k) for k in keys]
        error = next((e for e in errors if e), None)
        funnel.pend(stage, f"call failed ({error.split(':')[0]})" if error else "not processed yet")

    def replies(self, stage: str, key: str) -> list[str] | None:
        rec = self.store.get(stage, key)
        return None if rec is None else rec["replies"]


# ----------------------------------------------------------------------------- stages


def stage_regions(run: Run, images: list[ImageInfo], execute: bool, f: Funnel) -> list[Region]:
    """Propose regions per image (teacher, opencv or boxes), then filter them."""
    cfg = run.cfg.regions
    f.enter("regions", len(images))
    if cfg.backend == "teacher" and execute:
        run.ensure("regions", "lister", [_lister_job(run, img) for img in images])
    if cfg.backend == "opencv" and execute:
        for img in images:
            key = f"opencv:{img.sha1}"
            if run.store.has("regions", key):
                continue
            try:
                boxes = rg.propose_opencv(run.full(img), cfg.opencv, cfg.max_area_fraction, cfg.min_side)
            except ImageError as e:  # changed or vanished since intake
                run.failed["regions"][key] = f"image: {e}"
                continue
            run.store.put("regions", [(key, {"image": str(img.path), "boxes": [list(p.box) for p in boxes]})])
    out: list[Region] = []
    for img in images:
        props = _proposals(run, img, f)
        if props is None:
            continue
        f.keep("regions")
        f.enter("region_filter", len(props))
        kept, dropped = rg.filter_regions(props, img.width, img.height, cfg)
        for _, reason in dropped:
            f.drop("region_filter", reason)
        f.keep("region_filter", len(kept))
        out += [Region(img, p.box, p.label, p.score) for p in kept]
    return out


def _lister_job(run: Run, img: ImageInfo) -> Job:
    cfg = run.cfg.regions
    budget = run.cfg.roles.lister.endpoint(run.cfg.endpoint).max_image_pixels
    sent = budget_size(img.width, img.height, budget, cfg.pixel_factor) if cfg.coords == "pixels" else (
        img.width, img.height)

    return ask(f"teacher:{img.sha1}", lambda: [rg.lister_image(run.full(img), cfg.coords, budget, cfg.pixel_factor)],
               rg.lister_prompt(cfg.coords, sent), seed_of("lister", img.sha1),
               image=str(img.path), sent_size=list(sent), coords=cfg.coords)


def _proposals(run: Run, img: ImageInfo, f: Funnel) -> list[rg.Proposal] | None:
    """The image's proposals, or None after counting why there are none."""
    cfg = run.cfg.regions
    if cfg.backend == "boxes":
        props = run.boxes.get(img.path, [])
        if not props:
            f.drop("regions", "no boxes for this image in the boxes file")
            return None
        return props
    key = f"{cfg.backend}:{img.sha1}"
    rec = run.store.get("regions", key)
    if rec is None:
        run.missing(f, "regions", [key])
        return None
    if cfg.backend == "opencv":
        props = [rg.Proposal(tuple(b)) for b in rec["boxes"]]
        if not props:
            f.drop("regions", "no candidate regions found")
            return None
        return props
    props, problem = rg.parse_objects(rec["replies"][0], rec["coords"], tuple(rec["sent_size"]),
                                      (img.width, img.height))
    if problem:
        f.drop("regions", problem)
        return None
    if len(props) < cfg.min_objects:
        f.drop("regions", f"fewer than {cfg.min_objects} objects listed")
        return None
    return props


def stage_questions(run: Run, regions: list[Region], execute: bool, f: Funnel) -> list[Item]:
    cfg = run.cfg.questions
    f.enter("questions", len(regions))

    def job(r: Region) -> Job:
        examples = qs.pick_seeds(run.seeds, cfg.n_seeds, seed_of("seeds", r.key))
        return ask(r.key, lambda: [run.crop(r)], qs.question_prompt(cfg.per_crop, examples), seed_of("questions", r.key),
                   image=str(r.image.path), box=list(r.box))

    if execute:
        run.ensure("questions", "questioner", [job(r) for r in regions])
    out: list[Item] = []
    for r in regions:
        replies = run.replies("questions", r.key)
        if replies is None:
            run.missing(f, "questions", [r.key])
            continue
        found, problem = qs.parse_questions(replies[0], cfg.per_crop, cfg.max_chars)
        if problem:
            f.drop("questions", problem)
            continue
        f.keep("questions")
        out += [Item(r, q.text, q.dimension) for q in found]
    return out


def stage_validation(run: Run, items: list[Item], execute: bool, f: Funnel) -> list[Item]:
    f.enter("validation", len(items))
    if not run.cfg.validation.enabled:
        f.keep("validation", len(items))
        return items

    def job(it: Item) -> Job:
        def build() -> Conversation:  # two pictures, each introduced by its name
            return validation_conversation(run.full(it.region.image), run.crop(it.region), it.question)

        return Job(it.key, build, seed_of("validation", it.key), {"question": it.question})

    if execute:
        run.ensure("validation", "validator", [job(it) for it in items])
    out = []
    for it in items:
        replies = run.replies("validation", it.key)
        if replies is None:
            run.missing(f, "validation", [it.key])
            continue
        verdict, _ = parse_verdict(replies[0])
        if verdict != "yes":
            f.drop("validation", VERDICTS[verdict])
            continue
        f.keep("validation")
        out.append(it)
    return out


def stage_answers(run: Run, items: list[Item], execute: bool, f: Funnel) -> list[Item]:
    """Every teacher answers on the crop `samples` times; extraction never fails an item, it only
    withholds a vote."""
    cfg, roles = run.cfg.answers, run.cfg.roles
    teachers = list(zip(roles.teacher_names(), roles.teachers))
    f.enter("answers", len(items))
    if execute:
        for name, teacher in teachers:
            jobs = [ask(f"{it.key}|{name}", lambda it=it: [run.crop(it.region)],
                        ans.ANSWER_PROMPT.format(question=it.question), seed_of("answers", it.key, name),
                        question=it.question) for it in items]
            run.ensure("answers", name, jobs, n=teacher.samples)
    out = []
    for it in items:
        keys = [f"{it.key}|{name}" for name, _ in teachers]
        got = [run.replies("answers", k) for k in keys]
        if any(r is None for r in got):
            run.missing(f, "answers", keys)
            continue
        extracted = tuple(ans.extract_answer(t, cfg.max_chars, cfg.uncued_max_words) for r in got for t in r)
        total = sum(t.samples for _, t in teachers)
        f.keep("answers")
        out.append(replace(it, answers=extracted, total=total))
    return out


def stage_consensus(run: Run, items: list[Item], execute: bool, f: Funnel) -> list[Item]:
    cfg = run.cfg.consensus
    f.enter("consensus", len(items))
    if cfg.method == "judge" and execute:
        jobs = [ask(it.key, lambda: [], ans.judge_prompt(it.question, list(it.answers)), seed_of("judge", it.key),
                    question=it.question) for it in items]  # text only
        run.ensure("consensus", "judge", jobs)
    out = []
    for it in items:
        if cfg.method == "judge":
            replies = run.replies("consensus", it.key)
            if replies is None:
                run.missing(f, "consensus", [it.key])
                continue
            c = ans.parse_judge(replies[0], list(it.answers), it.total)
            if c is None:
                f.drop("consensus", "judge reply is not a valid grouping")
                continue
        else:
            c = ans.rule_consensus(list(it.answers), it.total, cfg.fuzzy, strict=it.dimension == "ocr")
        if c.answer is None:
            f.drop("consensus", "no teacher gave an extractable answer")
        elif not c.reached(cfg.min_agreement):
            f.drop("consensus", f"agreement under {cfg.min_agreement:.0%} of {it.total} votes")
        else:
            f.keep("consensus")
            out.append(replace(it, answer=c.answer, votes=c.votes))
    return out


def stage_distill(run: Run, items: list[Item], execute: bool, f: Funnel) -> list[Item]:
    """Move the question onto the full image: overlay + pointing sentence; options for the MCQ form."""
    cfg = run.cfg.distill
    f.enter("distill", len(items))
    if cfg.form == "open":
        f.keep("distill", len(items))
        return [replace(it, problem=dst.open_problem(it.question)) for it in items]

    def key(it: Item) -> str:
        return f"{it.key}|{short_hash(it.answer)}"

    if execute:
        jobs = [ask(key(it), lambda it=it: [run.overlay(it.region)],
                    dst.distractor_prompt(it.question, it.answer, cfg.n_distractors), seed_of("distractors", key(it)),
                    question=it.question, answer=it.answer) for it in items]
        run.ensure("distill", "distractor", jobs)
    out = []
    fuzzy = run.cfg.consensus.fuzzy
    for it in items:
        replies = run.replies("distill", key(it))
        if replies is None:
            run.missing(f, "distill", [key(it)])
            continue
        distractors, problem = dst.parse_distractors(replies[0], it.answer, cfg.n_distractors, fuzzy,
                                                     strict=it.dimension == "ocr")
        if problem:
            f.drop("distill", problem)
            continue
        options, letter = dst.build_options(it.answer, distractors, seed_of("options", key(it)))
        f.keep("distill")
        out.append(replace(it, options=options, letter=letter, problem=dst.mcq_problem(it.question, options)))
    return out


def stage_difficulty(run: Run, items: list[Item], execute: bool, f: Funnel) -> list[Item]:
    """Keep what the student proxy mostly gets wrong; a failed call keeps the item out."""
    cfg, form = run.cfg.difficulty, run.cfg.distill.form
    n = run.cfg.roles.student.samples
    f.enter("difficulty", len(items))
    if not cfg.enabled:
        f.keep("difficulty", len(items))
        return items

    def key(it: Item) -> str:
        return f"{it.key}|{short_hash(it.problem)}"

    if execute:
        jobs = [ask(key(it), lambda it=it: [run.overlay(it.region)], diff.student_prompt(it.problem, form),
                    seed_of("student", key(it)), question=it.question) for it in items]
        run.ensure("difficulty", "student", jobs, n=n)
    out = []
    for it in items:
        replies = run.replies("difficulty", key(it))
        if replies is None:
            run.missing(f, "difficulty", [key(it)])
            continue
        right = diff.count_correct(replies, it.answer, it.options, form)
        if right > cfg.max_correct:
            f.drop("difficulty", f"too easy: the student is right {right} of {len(replies)} times")
            continue
        f.keep("difficulty")
        out.append(replace(it, student_correct=right, student_samples=len(replies)))
    return out


STAGES = (stage_questions, stage_validation, stage_answers, stage_consensus, stage_distill, stage_difficulty)


def advance(run: Run, images: list[ImageInfo], execute: bool, funnel: Funnel) -> list[Item]:
    """Take images through every stage; with `execute`, make the missing calls first."""
    items: Any = stage_regions(run, images, execute, funnel)
    for stage in STAGES:
        items = stage(run, items, execute, funnel)
    return items


# ----------------------------------------------------------------------------- the run


def output_suffix(cfg: SynthConfig) -> str:
    """"" for an unsharded run, ".1of4" for shard 1 of 4 (funnel1of4.md, samples.1of4.parquet ...)."""
    i, n = cfg.shard_index
    return "" if n == 1 else f".{i}of{n}"


def run_synth(cfg: SynthConfig) -> Path:
    """Run (or resume) the pipeline; returns the output folder (funnel, parquet files, store).

    Raises SynthError when an endpoint fails a whole batch, after writing the funnel and the
    export of what is kept so far; a rerun resumes from the store.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Progress(cfg.progress) as progress:
        run = Run(cfg, progress)
        images, dropped = intake(cfg.images, cfg.intake, run.store, cfg.seed, cfg.shard_index)
        error = execute(run, images)
    finish(run, images, dropped)
    if error is not None:
        raise error
    failed = [e for errors in run.failed.values() for e in errors.values()]
    if failed:
        log.warning("%d model calls failed (first: %s); their items are pending: rerun to retry them",
                    len(failed), failed[0])
    return out


def execute(run: Run, images: list[ImageInfo]) -> SynthError | None:
    """Make every missing call, wave by wave; returns the error that stopped the run, if any."""
    try:
        task = run.progress.task("images", len(images))
        for wave in batched(images, run.cfg.wave_size):
            advance(run, wave, True, Funnel())
            run.progress.advance(task, len(wave))
    except SynthError as e:
        return e
    finally:
        run.roles.close()
    return None


def finish(run: Run, images: list[ImageInfo], dropped: list[tuple[str, str]]) -> dict[str, Any]:
    """One pass over the store with no calls: the funnel report and the exported files."""
    cfg, suffix = run.cfg, output_suffix(run.cfg)
    funnel = Funnel()
    funnel.enter("intake", len(images) + len(dropped))
    funnel.keep("intake", len(images))
    for _, reason in dropped:
        funnel.drop("intake", reason)
    paths, kept = export(advance(run, images, False, funnel), Views(run.crop, run.overlay), cfg, funnel, suffix)
    funnel.extra.update(
        kept_by_dimension=dict(sorted(Counter(it.dimension or "unknown" for it in kept).items())),
        answer_letters=dict(sorted(Counter(it.letter for it in kept if it.letter).items())),
        shard=cfg.shard,
        files={k: str(p) for k, p in paths.items()},
        torn_store_lines=run.store.torn_lines,
    )
    report = funnel.report(usage_by_role(run.store))
    write_report(report, run.out, suffix)
    return report


def main(argv: list[str] | None = None) -> int:
    """python -m zoomless.synth.runner CONFIG [--set key=value ...] [--shard i/n]"""
    parser = argparse.ArgumentParser(prog="python -m zoomless.synth.runner", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shard", default=None, metavar="I/N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_overrides(args.overrides)
        if args.shard is not None:
            overrides["shard"] = args.shard
        cfg = load_synth_config(args.config, overrides)
        out = run_synth(cfg)
    except (SynthError, SynthConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / f"funnel{output_suffix(cfg)}.md").read_text())
    print(f"output: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

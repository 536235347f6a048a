"""Vision-OPD's guarantees beyond the recipe's mechanics: the loss's gradients (gradcheck), the
memory it holds as the vocabulary grows, that training closes the view gap on held-out prompts,
that the teacher really sees the crop, and that bad samples stop or are skipped, never silently."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from zoomless.engines.base import SamplingParams
from zoomless.engines.hf import HFEngine
from zoomless.imaging import render_view
from zoomless.models.loading import load_processor, load_vlm, vision_token_ids
from zoomless.sample import Sample, read_samples, write_samples
from zoomless.train.batching import build_batch, encode_prompt
from zoomless.train.common import pad_id
from zoomless.train.config import OPDConfig, SFTConfig
from zoomless.train.losses import chunked_map, gather_logprobs, topk_generalized_jsd, topk_ids
from zoomless.train.memory import PeakTensorMemory, SavedTensorMemory
from zoomless.train.opd import distill_tokens, train_opd
from zoomless.train.rollouts import filter_generations
from zoomless.train.screening import BAD_SAMPLES_FILE, BadSampleError, SampleScreen, ScreenedData
from zoomless.train.sft import train_sft
from zoomless.train.views import view_conversation
from zoomless.world.generate import generate_split

PIXELS = 112 * 112
VIEW = dict(max_pixels=PIXELS, crop_margin=0.25, zoom=2.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opd_props")
    return {
        "model": tiny_model,
        "train": generate_split(root / "world", "train", 12, seed=0, size=448, progress=False),
        "held": generate_split(root / "held", "val", 4, seed=1, size=448, progress=False),  # other scenes
    }


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_topk_jsd_passes_gradcheck_in_float64(alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    zt = torch.randn(4, 9, generator=g, dtype=torch.float64) * 2
    ids = topk_ids(zs.detach(), 3)  # k < V: the tail bucket carries mass; the selection is held fixed
    t = gather_logprobs(zt, ids, 1.5)
    assert topk_generalized_jsd(zs, ids, t, alpha, 1.5).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: topk_generalized_jsd(z, ids, t, alpha, 1.5), (zs,))


def test_chunked_jsd_passes_gradcheck_through_the_lm_head() -> None:
    """Hidden states and head weight, through the recomputing chunks (5 rows in chunks of 2)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    with torch.no_grad():
        ids = topk_ids(h @ w.T, 3)
        t = gather_logprobs(torch.randn(5, 9, generator=g, dtype=torch.float64), ids)

    def jsd(z: torch.Tensor, i: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return topk_generalized_jsd(z, i, tt, 0.5)

    def loss(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return chunked_map(h, lambda x: x @ w.T, jsd, ids, t, chunk_size=2)

    assert torch.autograd.gradcheck(loss, (h, w))


# ----------------------------------------------------------------------------- memory


def test_memory_trackers_count_new_tensors_once() -> None:
    weight = torch.randn(1000)
    with PeakTensorMemory() as m:
        a = torch.empty(2000)  # 8 000 bytes
        view, _ = a[:10], weight.view(10, 100)  # views add nothing
        del a, view
        b = torch.empty(500)  # 2 000 bytes, after the first is freed
    assert m.peak == 8000 and m.current == 2000 and b.numel() == 500
    x = torch.randn(100, requires_grad=True)
    with SavedTensorMemory() as s:
        y = x.exp()
        (y * y).sum()  # y is saved by exp and twice by mul: counted once
    assert s.bytes == 400
    with SavedTensorMemory() as s:
        (x * x.exp()).sum()  # x and exp(x)
    assert s.bytes == 800


N, H, K, CHUNK = 256, 64, 16, 32


def _chunked_step(h: torch.Tensor, head: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ids = chunked_map(h.detach(), head, lambda z: topk_ids(z, K), chunk_size=CHUNK)
    return chunked_map(h, head, lambda z, i, tt: topk_generalized_jsd(z, i, tt), ids, t, chunk_size=CHUNK).mean()


def _naive_step(h: torch.Tensor, head: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The same loss from all [N, V] logits at once, as a plain implementation would write it."""
    z = head(h)
    logp = torch.log_softmax(z, -1)
    ids = logp.detach().topk(K, -1).indices
    s = logp.gather(-1, ids)
    s = torch.cat([s, torch.log1p(-s.exp().sum(-1, keepdim=True))], -1)
    tt = torch.cat([t, torch.log1p(-t.exp().sum(-1, keepdim=True))], -1)
    m = torch.logaddexp(s, tt) - torch.log(torch.tensor(2.0))
    return (0.5 * (s.exp() * (s - m)).sum(-1) + 0.5 * (tt.exp() * (tt - m)).sum(-1)).mean()


def _measure(step, vocab: int, tokens: int = N) -> tuple[int, int]:
    """(bytes saved for backward, peak bytes of new tensors in forward + backward) of one step."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, vocab, bias=False)
    h = torch.randn(tokens, H, generator=g).requires_grad_(True)
    t = torch.log_softmax(torch.randn(tokens, vocab, generator=g), -1)[:, :K].contiguous()  # teacher side: [N, k]
    with SavedTensorMemory() as saved:
        step(h, head, t)
    with PeakTensorMemory() as peak:
        step(h, head, t).backward()
    return saved.bytes, peak.peak


def test_no_tokens_x_vocab_tensor_is_kept_as_the_vocabulary_grows() -> None:
    rows = {v: (_measure(_chunked_step, v), _measure(_naive_step, v)) for v in (1024, 8192, 65536)}
    chunked_saved = {v: r[0][0] for v, r in rows.items()}
    for v, ((saved, peak), (naive_saved, naive_peak)) in rows.items():
        logits, weight = N * v * 4, v * H * 4
        # autograd keeps only the [N, H] hidden states and the [N, k] ids and teacher log-probs
        assert saved == chunked_saved[1024] <= N * (H + 3 * K) * 8, (v, saved)
        assert naive_saved >= logits  # the plain version keeps [N, V] logits for its backward
        # the chunked peak: the head's weight gradient plus a few [chunk, V] buffers, never [N, V]
        assert peak <= weight + 6 * CHUNK * v * 4 + N * H * 8, (v, peak)
        assert naive_peak >= weight + 2 * logits and peak < naive_peak / 3, (v, peak, naive_peak)
    # the plain version's saved bytes grow with V (x64 over this range), the chunked ones not at all
    assert rows[65536][1][0] > 50 * rows[1024][1][0]


def test_chunked_peak_stays_flat_as_tokens_grow() -> None:
    (_, small), (_, large) = _measure(_chunked_step, 8192, 256), _measure(_chunked_step, 8192, 1024)
    (_, naive_small), (_, naive_large) = _measure(_naive_step, 8192, 256), _measure(_naive_step, 8192, 1024)
    assert large < 1.2 * small  # 4x the tokens: only the [N, H] and [N, k] parts grow
    assert naive_large > 3 * naive_small


# ----------------------------------------------------------------------------- training closes the gap


def _seeing_model(model_dir: Path, out: Path) -> Path:
    """The tiny model with fan-in scaled weights. At the usual 0.02 init its answers barely depend
    on the image (the full and zoomed views differ by ~1e-6 nats): there is no gap to close."""
    model, processor = load_vlm(model_dir, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_a_short_opd_run_lowers_the_jsd_on_held_out_prompts(assets, tmp_path) -> None:
    base_dir = _seeing_model(assets["model"], tmp_path / "base")
    base, processor = load_vlm(base_dir, dtype=torch.float32, device="cpu")
    held = read_samples(assets["held"])
    full = [encode_prompt(processor, view_conversation(s, "full", "mcq", **VIEW)) for s in held]
    zoom = [encode_prompt(processor, view_conversation(s, "teacher", "mcq", **VIEW)) for s in held]
    convs = [view_conversation(s, "full", "mcq", **VIEW) for s in held]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=7)
    gens = HFEngine(base, processor, batch_size=8).generate(convs, params)
    fixed = filter_generations(gens, vision_token_ids(processor)).rollouts  # the same responses before and after
    assert len(fixed) >= 6
    responses = [r.token_ids for r in fixed]
    sb = build_batch([full[r.prompt_index] for r in fixed], responses, pad_id(processor))
    tb = build_batch([zoom[r.prompt_index] for r in fixed], responses, pad_id(processor))

    def held_out_jsd(student: torch.nn.Module) -> float:  # student on the full image, base teacher on the zoom
        with torch.no_grad():
            return float(distill_tokens(student, base, sb, tb, topk=16, alpha=0.5).jsd.mean())

    before = held_out_jsd(base)
    cfg = OPDConfig(
        model_dir=base_dir, data=assets["train"], out_dir=tmp_path / "run", lr=3e-3, warmup_steps=0, max_steps=12,
        batch_size=6, n=2, max_new_tokens=6, topk=16, micro_batch_size=12, teacher="frozen", max_pixels=PIXELS,
        tensorboard=False, progress=False,
    )
    trained, _ = load_vlm(train_opd(cfg), dtype=torch.float32, device="cpu")
    after = held_out_jsd(trained)
    assert before > 1e-3  # a real gap between the views to begin with
    assert after < 0.75 * before, (before, after)


# ----------------------------------------------------------------------------- the teacher's view


def _pixels(processor, image) -> torch.Tensor:
    return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def _copies_of(pixels: torch.Tensor, one: torch.Tensor) -> bool:
    """pixels holds one image's patches once per row of the batch."""
    rows, rem = divmod(pixels.shape[0], one.shape[0])
    return rem == 0 and rows >= 1 and torch.equal(pixels, one.repeat(rows, 1))


@pytest.mark.parametrize("case", ["zoom", "crop", "teacher_image"])
def test_the_teacher_sees_the_crop_and_the_student_the_full_image(assets, tmp_path, monkeypatch, case: str) -> None:
    samples = read_samples(assets["train"])
    s = samples[0].with_(teacher_image=samples[1].image) if case == "teacher_image" else samples[0]
    data = write_samples([s], tmp_path / "one.jsonl")
    calls: list[tuple[object, torch.Tensor, bool]] = []
    forward = Qwen2_5_VLModel.forward

    def spy(self, *args, **kwargs):  # every multimodal forward: generation, student, teacher
        if kwargs.get("pixel_values") is not None:
            calls.append((self, kwargs["pixel_values"].detach().clone(), torch.is_grad_enabled()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2_5_VLModel, "forward", spy)
    students = []

    def engine(model, processor):
        students.append(model.model)
        return HFEngine(model, processor, batch_size=4)

    cfg = OPDConfig(
        model_dir=assets["model"], data=data, out_dir=tmp_path / "run", max_steps=1, batch_size=1, n=2,
        max_new_tokens=4, topk=8, teacher="frozen", teacher_view="crop" if case == "crop" else "teacher",
        max_pixels=PIXELS, tensorboard=False, progress=False,
    )
    train_opd(cfg, make_engine=engine)

    processor = load_processor(assets["model"])
    full = _pixels(processor, render_view(s, "full", **VIEW)[0])
    teacher_view = {"zoom": "zoom", "crop": "crop", "teacher_image": "teacher"}[case]
    expected = _pixels(processor, render_view(s, teacher_view, **VIEW)[0])
    if case == "teacher_image":  # the explicit teacher image, not the sample's own zoom
        own_zoom = _pixels(processor, render_view(s.with_(teacher_image=None), "zoom", **VIEW)[0])
        assert not torch.equal(expected, own_zoom)
    assert full.shape != expected.shape or not torch.equal(full, expected)
    student_calls = [(p, g) for m, p, g in calls if m is students[0]]
    teacher_calls = [(p, g) for m, p, g in calls if m is not students[0]]
    assert student_calls and teacher_calls
    assert any(g for _, g in student_calls)  # the student's training forward (with grad) ...
    assert all(_copies_of(p, full) for p, _ in student_calls)  # ... and its sampling both saw the full image
    assert not any(g for _, g in teacher_calls)
    assert all(_copies_of(p, expected) for p, _ in teacher_calls)


# ----------------------------------------------------------------------------- bad samples


@pytest.fixture(scope="module")
def bad_data(assets, tmp_path_factory) -> dict[str, object]:
    """A data file with 4 good samples and 3 bad ones: an image that is not an image, a truncated
    PNG (its header reads, its pixels do not) and a sample without a box."""
    root = tmp_path_factory.mktemp("bad")
    good = read_samples(assets["train"])
    (root / "garbage.png").write_bytes(b"this is not a picture")
    png = Path(good[2].image).read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    garbage = good[0].with_(id="bad_garbage", image=str(root / "garbage.png"))
    nobox = good[1].with_(id="bad_nobox", box=None)
    truncated = good[2].with_(id="bad_truncated", image=str(root / "truncated.png"))
    return {
        "all": write_samples([garbage, *good[3:7], nobox, truncated], root / "bad.jsonl"),
        "truncated": write_samples([*good[3:7], truncated], root / "truncated.jsonl"),
        "reasons": {
            "bad_garbage": "not a recognised image format", "bad_nobox": "needs a 'box'", "bad_truncated": "truncated",
        },
    }


def _opd(assets, data: Path, out: Path, **kw) -> OPDConfig:
    return OPDConfig(
        model_dir=assets["model"], data=data, out_dir=out, max_steps=2, batch_size=4, n=1, max_new_tokens=4, topk=8,
        micro_batch_size=4, max_pixels=PIXELS, tensorboard=False, progress=False, **kw,
    )


def _sft(assets, data: Path, out: Path, **kw) -> SFTConfig:
    return SFTConfig(
        model_dir=assets["model"], data=data, out_dir=out, max_steps=2, batch_size=4, micro_batch_size=4,
        view={"full": 1.0, "zoom": 1.0}, max_pixels=PIXELS, tensorboard=False, progress=False, **kw,
    )


RECIPES = {"opd": (_opd, train_opd), "sft": (_sft, train_sft)}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_bad_samples_are_skipped_logged_and_counted(assets, bad_data, tmp_path, recipe: str) -> None:
    make, train = RECIPES[recipe]
    out = tmp_path / "run"
    train(make(assets, bad_data["all"], out, on_bad_sample="skip"))
    logged = [json.loads(line) for line in (out / BAD_SAMPLES_FILE).read_text().splitlines()]
    assert sorted(e["id"] for e in logged) == sorted(bad_data["reasons"])
    for e in logged:
        assert bad_data["reasons"][e["id"]] in e["reason"] and e["source"] == str(bad_data["all"]), e
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2] and m[-1]["bad_samples"] == 3
    if recipe == "opd":
        assert all(r["rollouts"] == 4 for r in m)  # batches are topped up to their full size
    else:
        assert all(r["loss"] > 0 and r["tokens"] >= 8 for r in m)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_bad_samples_stop_the_run_with_one_line_naming_file_and_id(assets, bad_data, tmp_path, recipe: str) -> None:
    make, train = RECIPES[recipe]
    # found before training: the first bad row is named, the others are counted and listed in the log
    with pytest.raises(BadSampleError) as err:
        train(make(assets, bad_data["all"], tmp_path / "a"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{bad_data['all']}: sample bad_garbage: image ")
    assert "not a recognised image format" in msg and "1 more" in msg
    assert not list((tmp_path / "a").glob("checkpoint-*"))
    # found when first drawn: the truncated image's pixels
    where = re.escape(str(bad_data["truncated"]))
    with pytest.raises(BadSampleError, match=rf"^{where}: sample bad_truncated: image .*truncated\.png: .*truncated"):
        train(make(assets, bad_data["truncated"], tmp_path / "b"))


def test_the_skipped_set_is_part_of_the_resumable_data_order() -> None:
    samples = [Sample(id=f"s{i}", image="unused.png", question="q") for i in range(7)]

    def probe(s) -> None:
        if s.id in ("s2", "s5"):
            raise ValueError(f"{s.id}: broken")

    def data() -> ScreenedData:
        d = ScreenedData(samples, 3, seed=4, screen=SampleScreen("skip", ["f.jsonl"] * 7, None))
        d.probe = probe
        return d

    straight = data()
    first = [straight.next_batch() for _ in range(2)]
    state = straight.state_dict()
    rest = [straight.next_batch() for _ in range(4)]
    resumed = data()
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(4)] == rest
    assert sorted(b.id for b in resumed.screen.bad.values()) == sorted(b.id for b in straight.screen.bad.values())
    for batch in first + rest:
        assert len(batch) == 3 and not {2, 5} & set(batch)
    with pytest.raises(BadSampleError, match=r"^f.jsonl: sample s[25]: broken"):
        stop = ScreenedData(samples, 7, seed=0, screen=SampleScreen("stop", ["f.jsonl"] * 7, None))
        stop.probe = probe
        stop.next_batch()

"""Vision-OPD recipe on a tiny real model: the distillation signal, the EMA teacher, drops, exact resume."""

import gc
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoomless.engines.base import Generation
from zoomless.engines.hf import HFEngine
from zoomless.models.loading import load_vlm, vision_token_ids
from zoomless.sample import read_samples
from zoomless.train.batching import build_batch, encode_prompt
from zoomless.train.checkpoints import checkpoint_dir
from zoomless.train.common import pad_id
from zoomless.train.config import OPDConfig
from zoomless.train.opd import check_views, distill_tokens, train_opd
from zoomless.train.prefetch import Prefetcher
from zoomless.train.views import view_conversation
from zoomless.world.generate import generate_split


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("opd")
    model = tiny_model
    data = generate_split(root / "world", "train", 4, seed=0, size=448, progress=False)
    return model, data


def _cfg(assets, out: Path, **kw) -> OPDConfig:
    model, data = assets
    base = dict(
        model_dir=model, data=data, out_dir=out, lr=1e-3, warmup_steps=0, max_steps=2, batch_size=2, n=2,
        max_new_tokens=6, topk=16, micro_batch_size=3, max_pixels=112 * 112, tensorboard=False, progress=False,
    )
    base.update(kw)
    return OPDConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _params(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_vlm(path, dtype=torch.float32, device="cpu")
    return dict(model.named_parameters())


def _model_and_views(assets):
    """The tiny model, its processor, and one sample's full-view and teacher-view prompts."""
    model_dir, data = assets
    model, processor = load_vlm(model_dir, dtype=torch.float32, device="cpu")
    s = read_samples(data)[0]
    view = dict(max_pixels=112 * 112, crop_margin=0.25, zoom=2.0)
    full = encode_prompt(processor, view_conversation(s, "full", "mcq", **view))
    crop = encode_prompt(processor, view_conversation(s, "teacher", "mcq", **view))
    return model, processor, full, crop


def test_distillation_is_zero_on_the_same_view_and_positive_across_views(assets) -> None:
    model, processor, full, crop = _model_and_views(assets)
    responses = [[40, 41, 42, 43], [50, 51]]
    sb = build_batch([full, full], responses, pad_id(processor))
    tb = build_batch([crop, crop], responses, pad_id(processor))
    same = distill_tokens(model, model, sb, sb, topk=16, alpha=0.5)
    other = distill_tokens(model, model, sb, tb, topk=16, alpha=0.5)
    assert same.jsd.shape == other.jsd.shape == (6,)
    assert same.jsd.abs().max() < 1e-7 and same.agree.all()
    assert (other.jsd > 1e-7).all() and other.jsd.mean() > 1e3 * same.jsd.abs().max().clamp(min=1e-12)
    other.jsd.sum().backward()  # gradients reach the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_crop_anchor_adds_the_student_on_the_teacher_view(assets, tmp_path) -> None:
    """The anchor runs the same responses under the teacher's view in the student's forward: the main
    divergence is unchanged, and the anchor is zero when the student is the teacher."""
    model, processor, full, crop = _model_and_views(assets)
    responses = [[40, 41, 42, 43], [50, 51]]
    sb = build_batch([full, full], responses, pad_id(processor))
    both = build_batch([full, full, crop, crop], responses * 2, pad_id(processor))
    tb = build_batch([crop, crop], responses, pad_id(processor))
    plain = distill_tokens(model, model, sb, tb, topk=16, alpha=0.5)
    anchored = distill_tokens(model, model, both, tb, topk=16, alpha=0.5, anchor=True)
    assert plain.anchor_jsd is None and anchored.anchor_jsd.shape == (6,)
    torch.testing.assert_close(anchored.jsd, plain.jsd, atol=1e-6, rtol=1e-5)  # padding to the wider rows only
    assert torch.equal(anchored.agree, plain.agree)
    assert anchored.anchor_jsd.abs().max() < 1e-6 < plain.jsd.min()

    final = train_opd(_cfg(assets, tmp_path / "anchor", max_steps=2, teacher="frozen", crop_anchor=1.0))
    m = _metrics(tmp_path / "anchor")
    assert m[0]["anchor_jsd"] < 1e-6 < m[0]["jsd"]  # step 1: the student still is the frozen teacher
    assert m[1]["anchor_jsd"] > m[0]["anchor_jsd"]  # after one update it is not
    assert (final / "teacher").is_dir()
    with pytest.raises(ValueError, match="crop_anchor needs teacher"):
        _cfg(assets, tmp_path / "x", crop_anchor=1.0, teacher="student")


def test_ema_teacher_after_one_step_and_frozen_teacher(assets, tmp_path) -> None:
    base = _params(assets[0])
    final = train_opd(_cfg(assets, tmp_path / "ema", max_steps=1))
    student, teacher = _params(final), _params(final / "teacher")
    moved = 0
    for name, b in base.items():
        expected = 0.95 * b + 0.05 * student[name]
        torch.testing.assert_close(teacher[name], expected, atol=1e-7, rtol=1e-6)
        moved += not torch.equal(student[name], b)
    assert moved > 0
    m = _metrics(tmp_path / "ema")[0]
    for key in ("jsd", "tokens", "dropped", "response_len", "grad_norm", "agreement", "seconds/data",
                "seconds/rollout", "seconds/student", "seconds/teacher", "seconds/step", "seconds/sync"):
        assert key in m, key
    assert m["tokens"] > 0 and m["rollouts"] == 4 and 0 <= m["agreement"] <= 1

    frozen = train_opd(_cfg(assets, tmp_path / "frozen", max_steps=1, teacher="frozen"))
    for name, t in _params(frozen / "teacher").items():
        assert torch.equal(t, base[name]), name


def test_bf16_teacher_is_the_rounded_ema_and_resumes_exactly(assets, tmp_path) -> None:
    """`teacher_dtype: bfloat16`: the teacher is saved in bf16, within one bf16 step of the fp32 EMA
    of its start and the student, and a resumed run rounds exactly as the uninterrupted one."""
    straight = train_opd(_cfg(assets, tmp_path / "a", max_steps=2, save_every=1, teacher_dtype="bfloat16"))
    first = checkpoint_dir(tmp_path / "a", 1)
    base, student, teacher = _weights(assets[0]), _weights(first), _weights(first / "teacher")
    moved = 0
    for name, t in teacher.items():
        assert t.dtype == torch.bfloat16, name
        start = base[name].to(torch.bfloat16).float()  # the copy starts rounded to nearest
        expected = 0.95 * start + 0.05 * student[name].float()
        step = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(expected.abs().clamp(min=1e-30)))
        assert ((t.float() - expected).abs() <= step).all(), name
        moved += not torch.equal(t.float(), start)
    assert moved > 0
    train_opd(_cfg(assets, tmp_path / "b", max_steps=1, teacher_dtype="bfloat16"))
    resumed = train_opd(_cfg(assets, tmp_path / "b", max_steps=2, resume=True, teacher_dtype="bfloat16"))
    for name, t in _weights(straight / "teacher").items():
        assert torch.equal(t, _weights(resumed / "teacher")[name]), name
    with pytest.raises(ValueError, match="teacher_dtype is the dtype of an 'ema' or 'frozen'"):
        _cfg(assets, tmp_path / "x", teacher="student", teacher_dtype="bfloat16")


def test_resume_continues_exactly(assets, tmp_path) -> None:
    straight = train_opd(_cfg(assets, tmp_path / "a", max_steps=4, save_every=2))
    train_opd(_cfg(assets, tmp_path / "b", max_steps=2))
    resumed = train_opd(_cfg(assets, tmp_path / "b", max_steps=4, save_every=2, resume=True))
    for sub in ("", "teacher"):
        p1, p2 = _params(straight / sub), _params(resumed / sub)
        for name, t in p1.items():
            assert torch.equal(t, p2[name]), f"{sub or 'student'}: {name}"
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["jsd"] for r in a] == [r["jsd"] for r in b] and len(b) == 4


def prefetch_hits(monkeypatch, ahead: bool = True) -> list[bool]:
    """Whether each step's prompts came from the prefetch; `ahead=False`: nothing is prefetched,
    every step prepares its prompts itself (the synchronous path)."""
    hits: list[bool] = []
    get = Prefetcher.get

    def counted(self, key, fn):
        before = self.hits
        out = get(self, key, fn)
        hits.append(self.hits > before)
        return out

    monkeypatch.setattr(Prefetcher, "get", counted)
    if not ahead:
        monkeypatch.setattr(Prefetcher, "ahead", lambda self, key, fn: None)
    return hits


def same_run(a: Path, b: Path, subdirs: tuple[str, ...]) -> None:
    """Bit-identical weights and metrics (but the seconds) in two runs' output folders."""
    for sub in subdirs:
        p1, p2 = _params(checkpoint_dir(a, 3) / sub), _params(checkpoint_dir(b, 3) / sub)
        for name, t in p1.items():
            assert torch.equal(t, p2[name]), f"{sub or 'student'}: {name}"
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds/")} for r in rows]  # noqa: E731
    assert drop(_metrics(a)) == drop(_metrics(b))


def probed_samples(monkeypatch) -> list[str]:
    """The ids of the samples train_opd's first-draw probe renders (main thread, in `next_batch`)."""
    import zoomless.train.opd as opd

    probed: list[str] = []
    screen = opd.screen_samples

    def counting(run, check=None, probe=None):
        return screen(run, check=check, probe=lambda s: (probed.append(s.id), probe(s))[1])

    monkeypatch.setattr(opd, "screen_samples", counting)
    return probed


def test_prefetched_prompts_train_exactly_as_prepared_in_the_step(assets, tmp_path, monkeypatch) -> None:
    """Each step's prompts rendered and encoded in the background during the step before (across
    an epoch boundary: 4 samples, batches of 2) train the same weights as prepared in the step; a
    batch rendered ahead vouches for its samples, so the first-draw probe does not render them again."""
    kw = dict(max_steps=3, crop_anchor=1.0)  # the anchor puts student and teacher prompts in one batch
    with monkeypatch.context() as m:
        hits, probed = prefetch_hits(m), probed_samples(m)
        train_opd(_cfg(assets, tmp_path / "ahead", **kw))
    assert hits == [False, True, True]
    assert len(probed) == 2  # the first batch's: the second was rendered ahead, the third is epoch 2
    assert not [t for t in threading.enumerate() if t.name.startswith("zoomless-prefetch")]  # closed
    with monkeypatch.context() as m:
        hits, probed = prefetch_hits(m), probed_samples(m)
        train_opd(_cfg(assets, tmp_path / "sync", prefetch_prompts=False, **kw))  # the switch
    assert hits == [False, False, False]
    assert len(probed) == 4  # every sample on its first draw
    same_run(tmp_path / "ahead", tmp_path / "sync", ("", "teacher"))


def test_static_rollout_cache_trains_the_same(assets, tmp_path) -> None:
    """`rollout_cache: static` (a preallocated KV cache in the rollout engine) samples what the
    dynamic cache does, so the run's weights and metrics are the same to the bit."""
    train_opd(_cfg(assets, tmp_path / "dynamic", max_steps=3))
    train_opd(_cfg(assets, tmp_path / "static", max_steps=3, rollout_cache="static"))
    same_run(tmp_path / "dynamic", tmp_path / "static", ("", "teacher"))


def test_qwen3_5_trains_and_resumes(assets, tmp_path) -> None:
    """Qwen3.5 (Gated DeltaNet linear attention in some decoder layers, gated full attention in the
    others): Vision-OPD with bf16 weights, the bf16 EMA teacher and checkpointing trains, its
    distillation signal is positive, and a resumed run continues exactly."""
    from zoomless.models.tiny import build_tiny_vlm

    model = build_tiny_vlm(tmp_path / "qwen3_5", family="qwen3_5", size="test")
    _, data = assets
    kw = dict(model_dir=model, data=data, bf16_weights=True, teacher_dtype="bfloat16", gradient_checkpointing=True)
    straight = train_opd(_cfg(assets, tmp_path / "a", max_steps=3, **kw))
    train_opd(_cfg(assets, tmp_path / "b", max_steps=2, **kw))
    resumed = train_opd(_cfg(assets, tmp_path / "b", max_steps=3, resume=True, **kw))
    rows = _metrics(tmp_path / "a")
    assert len(rows) == 3 and all(r["jsd"] > 0 and r["skipped"] == 0 for r in rows)
    for sub in ("", "teacher"):
        p1, p2 = _params(straight / sub), _params(resumed / sub)
        assert all(torch.equal(t, p2[name]) for name, t in p1.items()), sub
    before, after = _params(model), _params(straight)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it learned something


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_opd_with_bf16_weights_saves_averages_and_resumes_from_the_masters(assets, tmp_path) -> None:
    base = _weights(assets[0])
    straight = train_opd(_cfg(assets, tmp_path / "a", max_steps=2, save_every=1, bf16_weights=True))
    first = checkpoint_dir(tmp_path / "a", 1)
    student, teacher = _weights(first), _weights(first / "teacher")
    off_grid = 0
    for name, w in student.items():
        assert w.dtype == torch.float32, name  # the masters, not the bf16 compute copy
        off_grid += not torch.equal(w, w.to(torch.bfloat16).float())
        torch.testing.assert_close(teacher[name], 0.95 * base[name].float() + 0.05 * w, atol=1e-7, rtol=1e-6)
    assert off_grid > 0
    assert "bf16_weights\": true" in (tmp_path / "a" / "train_config.json").read_text()

    train_opd(_cfg(assets, tmp_path / "b", max_steps=1, bf16_weights=True))
    resumed = train_opd(_cfg(assets, tmp_path / "b", max_steps=2, resume=True, bf16_weights=True))
    for sub in ("", "teacher"):
        p1, p2 = _weights(straight / sub), _weights(resumed / sub)
        for name, t in p1.items():
            assert torch.equal(t, p2[name]), f"{sub or 'student'}: {name}"
    jsd = [[json.loads(x)["jsd"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert jsd[0] == jsd[1]


def test_keys_that_need_another_say_so(assets, tmp_path) -> None:
    with pytest.raises(ValueError, match="bf16_weights computes in bf16"):
        _cfg(assets, tmp_path, dtype="float32", bf16_weights=True)
    with pytest.raises(ValueError, match="set gradient_checkpointing: true too"):
        _cfg(assets, tmp_path, uncheckpointed_layers=2)
    with pytest.raises(ValueError, match="set gradient_checkpointing: true too"):
        _cfg(assets, tmp_path, checkpoint_vision=False)


class InjectVisionToken:
    """Wraps the HF engine and plants a vision special token in the first response of every call."""

    def __init__(self, model, processor) -> None:
        self.inner = HFEngine(model, processor, batch_size=4)
        self.bad = vision_token_ids(processor)[0]
        self.name = "inject"

    collector_on: list[bool] = []  # gc.isenabled() at each call, inside the training loop

    def generate(self, conversations, params) -> list[list[Generation]]:
        self.collector_on.append(gc.isenabled())
        out = self.inner.generate(conversations, params)
        g = out[0][0]
        out[0][0] = Generation(g.text, [self.bad] + g.token_ids, g.logprobs, g.finish_reason)
        return out


def test_responses_with_vision_tokens_are_dropped_and_counted(assets, tmp_path) -> None:
    InjectVisionToken.collector_on.clear()
    train_opd(_cfg(assets, tmp_path / "drop", max_steps=2), make_engine=InjectVisionToken)
    for m in _metrics(tmp_path / "drop"):
        assert m["dropped_vision"] == 1 and m["dropped"] == 1 and m["rollouts"] == 4
        assert m["tokens"] > 0 and m["skipped"] == 0
    # the cyclic garbage collector stays off through the loop's steps (train/common.CollectBetweenSteps)
    # and is on again after it
    assert InjectVisionToken.collector_on == [False, False] and gc.isenabled()


def test_views_that_need_a_box_fail_before_training(assets) -> None:
    s = read_samples(assets[1])[0].with_(box=None)
    cfg = _cfg(assets, Path("unused"))
    with pytest.raises(ValueError, match=f"sample {s.id}: the 'teacher' view needs a 'box'"):
        check_views([s], cfg)
    check_views([s.with_(teacher_image=s.image)], cfg)  # an explicit teacher image needs no box
    with pytest.raises(ValueError, match="'overlay' view"):
        check_views([s.with_(teacher_image=s.image)], cfg.model_copy(update={"student_view": "overlay"}))


def test_several_updates_per_batch_use_truncated_is_weights(assets, tmp_path) -> None:
    train_opd(_cfg(assets, tmp_path / "is", max_steps=1, updates_per_batch=2, is_clip=2.0, teacher="student"))
    m = _metrics(tmp_path / "is")[0]
    assert 0 < m["is_weight"] <= 2.0 and m["is_weight"] != 1.0  # the policy moved after the first update
    assert m["skipped"] == 0
    assert not (tmp_path / "is" / "checkpoint-000001" / "teacher").exists()  # the live student is the teacher

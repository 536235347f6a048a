"""The shared training core: configs, EMA math, data order, schedule, rollout filtering."""

from pathlib import Path

import pytest
import torch

from zoomless.engines.base import Generation
from zoomless.sample import Sample
from zoomless.train import recipes
from zoomless.train.config import ConfigError, OPDConfig, SFTConfig, load_config, parse_overrides
from zoomless.train.data import DataIterator
from zoomless.train.ema import ema_update_, make_teacher, round_stochastically
from zoomless.train.optim import build_optimizer, clip_inside_fused_step, total_norm, warmup_constant_schedule
from zoomless.train.rollouts import filter_generations
from zoomless.train.screening import SampleScreen, ScreenedData

REQUIRED = {"model_dir": "m", "data": "d.jsonl", "out_dir": "o"}


def test_config_unknown_key_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "opd.yaml"
    path.write_text("model_dir: m\ndata: [a.jsonl, b.jsonl]\nout_dir: o\nalpah: 0.3\n")
    with pytest.raises(ConfigError, match=r"opd\.yaml: alpah: unknown key"):
        load_config(path, OPDConfig)
    path.write_text("model_dir: m\ndata: [a.jsonl, b.jsonl]\nout_dir: o\nalpha: 0.3\nteacher: ema\n")
    cfg = load_config(path, OPDConfig, {"teacher": "frozen", "n": 8})
    assert cfg.alpha == 0.3 and cfg.teacher == "frozen" and cfg.n == 8 and len(cfg.data) == 2
    with pytest.raises(ConfigError, match="teacher: Input should be"):
        load_config(path, OPDConfig, {"teacher": "oracle"})
    with pytest.raises(ConfigError, match=r"view: Value error, unknown view 'zoomm'"):
        load_config(None, SFTConfig, {**REQUIRED, "view": {"full": 1, "zoomm": 1}})
    with pytest.raises(ConfigError, match="model_dir: Field required"):
        load_config(None, SFTConfig, {"data": "d", "out_dir": "o"})
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml", SFTConfig)


def test_paths_in_a_training_config_are_relative_to_the_file(tmp_path: Path, monkeypatch) -> None:
    """As in a synth config: what the file says is relative to the file, --set values to the working folder."""
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "sft.yaml"
    path.write_text(f"model_dir: ../runs/m\ndata: [a.jsonl, {tmp_path / 'abs.jsonl'}]\nout_dir: out\n")
    monkeypatch.chdir(tmp_path / "configs")
    cfg = recipes.load("sft", path)
    assert cfg.model_dir == folder / "../runs/m" and cfg.out_dir == folder / "out"
    assert cfg.data == [folder / "a.jsonl", tmp_path / "abs.jsonl"]
    cfg = recipes.load("sft", path, ["out_dir=here", "data=d.jsonl"])
    assert cfg.out_dir == Path("here") and cfg.data == [Path("d.jsonl")] and cfg.model_dir == folder / "../runs/m"


def test_overrides_and_recipe_table(tmp_path: Path) -> None:
    assert parse_overrides(["lr=1e-4", "teacher=frozen", "max_pixels=12544"]) == {
        "lr": "1e-4", "teacher": "frozen", "max_pixels": 12544,
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])
    cfg = recipes.load("opd", None, [f"{k}={v}" for k, v in REQUIRED.items()] + ["lr=1e-4"], resume=True)
    assert isinstance(cfg, OPDConfig) and cfg.lr == 1e-4 and cfg.resume
    assert OPDConfig(**REQUIRED).lr == 2e-6 and OPDConfig(**REQUIRED).n == 4  # reference lr; n 8 in the reference
    with pytest.raises(ConfigError, match="unknown training method 'ppo'"):
        recipes.load("ppo", None, [])


def test_ema_after_one_step_is_the_fp32_average() -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    teacher = make_teacher(student, "ema")
    assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())
    old = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    student(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    ema_update_(teacher, student, 0.05)
    for n, p in teacher.named_parameters():
        new = dict(student.named_parameters())[n].detach()
        assert p.dtype == torch.float32
        assert not torch.equal(new, old[n])
        torch.testing.assert_close(p, 0.95 * old[n] + 0.05 * new, atol=1e-7, rtol=0)
    assert make_teacher(student, "student") is student
    frozen = make_teacher(student.to(torch.bfloat16), "frozen")
    assert all(p.dtype == torch.float32 for p in frozen.parameters())  # teacher copies are fp32
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update_(teacher, torch.nn.Linear(4, 3), 0.05)


def test_small_updates_survive_in_fp32_ema() -> None:
    # the reason for an fp32 EMA: a 0.05 * 1e-4 move is invisible in bf16 but kept in fp32
    student = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(student.weight, 1.0)
    teacher = make_teacher(student, "ema")
    with torch.no_grad():
        student.weight += 1e-4
    ema_update_(teacher, student, 0.05)
    assert teacher.weight.item() != 1.0
    assert torch.tensor(teacher.weight.item(), dtype=torch.bfloat16).item() == 1.0


def test_bf16_ema_rounds_stochastically_and_tracks_the_fp32_ema() -> None:
    """A bf16 teacher (`teacher_dtype: bfloat16`) under lr-sized steps: rounded to nearest, the EMA
    falls ever further behind the fp32 one (each 0.05 * lag move is below half a bf16 step until the
    lag is many steps); rounded stochastically (a new seed per update, as the recipe draws them) it
    stays unbiased, within about one bf16 step."""
    torch.manual_seed(0)
    student = torch.nn.Linear(64, 64)
    with torch.no_grad():
        student.weight.normal_(0, 0.02)
    exact, rounded = make_teacher(student, "ema"), make_teacher(student, "ema", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in rounded.parameters())
    nearest = student.weight.detach().to(torch.bfloat16)
    direction = torch.randn_like(student.weight).sign()
    for update in range(200):
        with torch.no_grad():
            student.weight += 2e-6 * direction  # a steady drift of lr-sized steps
        ema_update_(exact, student, 0.05)
        ema_update_(rounded, student, 0.05, seed=update * 0x85EBCA6B)
        nearest = nearest.float().lerp(student.weight.detach(), 0.05).to(torch.bfloat16)
    ref = exact.weight.detach()
    step = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(ref.abs()))  # bf16 spacing at ref
    err, err_nearest = (rounded.weight.float() - ref) / step, (nearest.float() - ref) / step
    assert err.mean().abs() < 0.1 and err.pow(2).mean().sqrt() < 1.0  # measured: 0.02 and 0.75
    assert err_nearest.abs().mean() > 3.0  # measured: 4.7 (and growing)
    moved = (rounded.weight.float() - student.weight.detach().to(torch.bfloat16).float()).abs().max()
    assert moved > 0  # the teacher lags the student, as an EMA should


def test_stochastic_rounding_is_unbiased_and_keeps_special_values() -> None:
    x = torch.tensor([1.0 + 2**-9, -(1.0 + 2**-9), 1.0, 0.0, float("inf"), -float("inf")])
    draws = torch.stack([round_stochastically(x, torch.tensor(seed * 7919)).float() for seed in range(2000)])
    up = 1.0 + 2**-7  # the bf16 neighbours of 1 + 2^-9 are 1 and 1 + 2^-7: up a quarter of the time
    assert set(draws[:, 0].tolist()) == {1.0, up} and abs((draws[:, 0] == up).float().mean() - 0.25) < 0.04
    assert set(draws[:, 1].tolist()) == {-1.0, -up} and abs((draws[:, 1] == -up).float().mean() - 0.25) < 0.04
    assert (draws[:, 2:] == x[2:]).all()
    assert torch.isnan(round_stochastically(torch.tensor([float("nan")]), torch.tensor(0))).all()
    within = round_stochastically(torch.full((100_000,), 1.0 + 2**-9), torch.tensor(3)).float()
    assert abs((within == up).float().mean() - 0.25) < 0.01  # across the elements of one draw too


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_bf16_ema_compiled_is_the_eager_update(device) -> None:
    """The fused update a GPU runs (torch.compile) draws the same bits as the eager one: the noise
    is a hash of the element index and the seed, not a generator's stream."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.LayerNorm(48)).to(device)
    eager = make_teacher(student, "ema", dtype=torch.bfloat16)
    fused = make_teacher(student, "ema", dtype=torch.bfloat16)
    before = eager[0].weight.clone()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    ema_update_(eager, student, 0.05, seed=11, compiled=False)
    ema_update_(fused, student, 0.05, seed=11, compiled=True)
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(eager[0].weight, before)


def test_bf16_ema_falls_back_to_eager_where_torch_compile_fails(monkeypatch) -> None:
    """No compiler for the GPU (no Triton, say): one warning, then the eager update, same bits."""
    from zoomless.train import ema

    def no_triton():
        def fail(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(fail, RuntimeError("no working triton"), None)
        return fail

    monkeypatch.setattr(ema, "_compiled_ema_bf16", no_triton)
    monkeypatch.setattr(ema, "_NO_COMPILER", [])
    torch.manual_seed(0)
    student = torch.nn.Linear(8, 8)
    eager, fallback = (make_teacher(student, "ema", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        student.weight.add_(0.01)
    ema_update_(eager, student, 0.05, seed=3, compiled=False)
    with pytest.warns(UserWarning, match="runs eagerly") as warned:
        ema_update_(fallback, student, 0.05, seed=3, compiled=True)
    assert len(warned) == 1  # once, not per tensor
    assert torch.equal(eager.weight, fallback.weight) and torch.equal(eager.bias, fallback.bias)
    assert "triton" in ema._NO_COMPILER[0]


def test_vision_token_responses_are_dropped_and_counted() -> None:
    gens = [
        [Generation("a", [5, 6, 2]), Generation("b", [5, 151, 2])],
        [Generation("", [], finish_reason="error", error="boom"), Generation("c", [7])],
    ]
    out = filter_generations(gens, banned_ids=[150, 151])
    assert out.total == 4 and out.dropped_vision == 1 and out.dropped_other == 1 and out.dropped == 2
    assert [(r.prompt_index, r.token_ids) for r in out.rollouts] == [(0, [5, 6, 2]), (1, [7])]


def test_data_iterator_epochs_and_state() -> None:
    it = DataIterator(5, batch_size=3, seed=1)
    batches = [it.next_batch() for _ in range(5)]  # 15 items = 3 epochs
    flat = [i for b in batches for i in b]
    for e in range(3):
        assert sorted(flat[5 * e : 5 * e + 5]) == list(range(5))
    assert flat[:5] != flat[5:10]  # reshuffled per epoch
    it2 = DataIterator(5, batch_size=3, seed=1)
    it2.next_batch(), it2.next_batch()
    it3 = DataIterator(5, batch_size=3, seed=1)
    it3.load_state_dict(it2.state_dict())
    assert [it3.next_batch() for _ in range(3)] == batches[2:]


def test_peek_batch_is_the_next_batch_and_leaves_the_state() -> None:
    """Across epoch boundaries (5 items, batches of 3), unshuffled, and with each process's slice."""
    for shuffle in (True, False):
        it = DataIterator(5, batch_size=3, seed=1, shuffle=shuffle)
        for _ in range(6):
            state = it.state_dict()
            peeked = it.peek_batch()
            assert it.state_dict() == state and it.peek_batch() == peeked
            assert it.next_batch() == peeked
    for rank in range(2):
        it = DataIterator(5, batch_size=4, seed=3)
        it.shard(rank, 2)
        whole = DataIterator(5, batch_size=4, seed=3)
        for _ in range(4):
            peeked = it.peek_batch()
            assert len(peeked) == 2 and it.next_batch() == peeked
            assert peeked == whole.next_batch()[2 * rank : 2 * rank + 2]


def test_peek_batch_of_screened_data_leaves_out_bad_samples() -> None:
    """Known bad samples are left out and the batch topped up as `next_batch` does; a sample not
    probed yet is assumed good (probing it would report it early): then the peek is only a guess."""
    samples = [Sample(id=f"s{i}", image="unused.png", question="q") for i in range(7)]

    def probe(s) -> None:
        if s.id in ("s2", "s5"):
            raise ValueError(f"{s.id}: broken")

    data = ScreenedData(samples, 3, seed=4, screen=SampleScreen("skip", ["f.jsonl"] * 7, None))
    data.probe = probe
    wrong = 0
    for _ in range(8):
        state, bad = data.state_dict(), set(data.screen.bad)
        peeked = data.peek_batch()
        assert data.state_dict() == state  # the skipped set included
        batch = data.next_batch()
        wrong += batch != peeked
        assert batch == peeked or set(data.screen.bad) > bad  # wrong only where a new bad sample was found
    assert wrong and data.screen.bad.keys() == {2, 5}
    assert data.peek_batch() == data.next_batch()


def test_warmup_then_constant_and_no_decay_on_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    opt = build_optimizer(model.parameters(), lr=1.0, weight_decay=0.01)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    sched = warmup_constant_schedule(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_clip_inside_the_fused_adamw_step_is_clipping_first() -> None:
    """The clip folded into fused AdamW's kernel updates as clip_grad_norm_ then step does, over
    steps above and below the limit; a non-finite norm leaves weights, moments and step count."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours, opt_theirs = (build_optimizer(ps, lr=0.05, weight_decay=0.1, fused=True) for ps in (ours, theirs))
    for scale in (30.0, 0.01, 5.0):  # norms well above, below and above max_norm=1
        grads = [torch.randn_like(p) * scale for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        opt_theirs.step()
        norm = total_norm([p.grad for p in ours])
        clip_inside_fused_step(opt_ours, norm, 1.0)
        torch.testing.assert_close(norm, expected)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert not hasattr(opt_ours, "grad_scale")  # the hooks are not left on the optimizer
    before = [p.detach().clone() for p in ours]
    moments = [opt_ours.state[p]["exp_avg"].clone() for p in ours]
    ours[0].grad, ours[1].grad = torch.full_like(ours[0], float("inf")), torch.zeros_like(ours[1])
    norm = total_norm([p.grad for p in ours])
    clip_inside_fused_step(opt_ours, norm, 1.0)
    assert not torch.isfinite(norm)
    for p, b, m in zip(ours, before, moments):
        assert torch.equal(p, b) and torch.equal(opt_ours.state[p]["exp_avg"], m)
        assert float(opt_ours.state[p]["step"]) == 3


def test_garbage_is_collected_between_steps_not_inside_them(monkeypatch) -> None:
    import gc
    import weakref

    from zoomless.train.common import CollectBetweenSteps

    class Node:
        pass

    def cycle() -> weakref.ref:
        node = Node()
        node.self = node  # a reference cycle: only the cyclic collector frees it
        return weakref.ref(node)

    started: list[int] = []
    record = lambda phase, info: phase == "start" and started.append(info["generation"])  # noqa: E731
    gc.callbacks.append(record)
    assert gc.isenabled()
    try:
        with CollectBetweenSteps(full_every=3) as collector:
            assert not gc.isenabled()  # no automatic collection inside a step
            alive = cycle()
            garbage = [[i] for i in range(5000)]  # allocations enough to start collections, were they on
            del garbage
            assert alive() is not None and started == []
            collector.after_step(1)
            assert alive() is None  # collected between steps
            # the slow step of the H100 runs: many young collections, then many new long-lived objects
            # (a compile); with the collector switched on between steps, the next allocation started a
            # full collection. Here it stays off between steps too.
            for step in range(2, 14):
                collector.after_step(step)
                assert not gc.isenabled()
            long_lived = [[i] for i in range(50_000)]
            started.clear()
            more = [[i] for i in range(5000)]
            assert started == []
            del long_lived, more
            generations = []
            monkeypatch.setattr(gc, "collect", lambda generation=2: generations.append(generation) or 0)
            for step in (14, 15, 16, 17):
                collector.after_step(step)
            monkeypatch.undo()
            assert generations == [1, 2, 1, 1]  # everything every `full_every` steps, the young ones else
        assert gc.isenabled()  # restored
    finally:
        gc.callbacks.remove(record)
    gc.disable()
    try:
        with CollectBetweenSteps():
            pass
        assert not gc.isenabled()  # a collector switched off before stays off
    finally:
        gc.enable()

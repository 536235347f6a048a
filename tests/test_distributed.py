"""Data parallelism on CPU: 2 processes (gloo) give the single-process step, under accelerate's
DDP and under its FSDP2 code paths.

One optimizer step of Vision-OPD and of SFT on a fixed global batch, once in this process and once
split over 2 spawned processes: the loss, the reduced gradients, the updated weights (and the EMA
teacher) agree within fp32 rounding. The rollouts are fixed (an engine that answers every prompt
with ids derived from its question), one of them dropped on the second process only, so that
process pads with a zero-weight micro-batch and the token counts differ between processes.
Also, on 2 processes: exact resume (under FSDP2 from sharded optimizer state), and sampling with
the HF engine (under FSDP2 from gathered weights).

The model ties its input and output embeddings (as Qwen2.5-VL-3B does), and the LM head runs in
chunks of a few rows, so each micro-batch calls it several times outside the wrapped forward: the
case where an FSDP2 unit of its own for the embedding and the head was left half-way and the EMA
update failed (train/distributed.py, `_head_in_root`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from zoomless.engines.base import Generation
from zoomless.models.loading import load_vlm
from zoomless.models.tiny import SIZES, build_tiny_vlm
from zoomless.sample import read_samples, write_samples
from zoomless.train import opd as opd_module
from zoomless.train import sft as sft_module
from zoomless.train.config import OPDConfig, SFTConfig
from zoomless.train.data import DataIterator
from zoomless.train.distributed import fsdp_units
from zoomless.world.generate import generate_split

WORLD = 2
TIED = "test-tied"  # the "test" size with tied input and output embeddings
DROP = " [drop]"  # questions with this mark lose their first rollout (as a vision-token response would)


class FixedEngine:
    """Answers every conversation with `n` fixed responses derived from its question text: the
    same responses whichever process asks, so a split batch samples what the whole batch does."""

    name = "fixed"

    def __init__(self, model: Any = None, processor: Any = None) -> None:
        pass

    def generate(self, conversations, params) -> list[list[Generation]]:
        out = []
        for conv in conversations:
            text = conv[-1]["content"][-1]["text"]
            h = zlib.crc32(text.encode())
            gens = []
            for j in range(params.n):
                ids = [100 + (h + 7 * j + 3 * k) % 50 for k in range(2 + (h + j) % 4)]
                gens.append(Generation(text="x", token_ids=ids, finish_reason="length"))
            if DROP in text:
                gens[0] = Generation(text="", finish_reason="error", error="dropped")
            out.append(gens)
        return out


def _configs(model: Path, data: Path, out: Path) -> dict[str, Any]:
    common = dict(
        model_dir=model, data=data, lr=1e-3, warmup_steps=0, max_steps=1, batch_size=4, max_pixels=112 * 112,
        tensorboard=False, progress=False, seed=0, logits_chunk_size=4,
    )
    return {
        "opd": OPDConfig(out_dir=out / "opd", n=2, topk=16, micro_batch_size=3, **common),
        "sft": SFTConfig(out_dir=out / "sft", micro_batch_size=2, **common),
    }


def _one_step(recipe: str, cfg: Any, main: bool) -> dict[str, Any] | None:
    """Train one step; on the main process return the metrics, the reduced gradients the optimizer
    saw, the updated weights (and teacher) read back from the checkpoint."""
    module = {"opd": opd_module, "sft": sft_module}[recipe]
    real, grads = module.clip_and_step, {}

    def capture(run, grad_clip):  # every process calls it: gathering FSDP's gradient shards is collective
        grads["fsdp_units"] = len(fsdp_units(run.policy))
        for name, p in run.model.named_parameters():
            if p.grad is not None:
                grads[name] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
        return real(run, grad_clip)

    module.clip_and_step = capture
    try:
        final = opd_module.train_opd(cfg, make_engine=FixedEngine) if recipe == "opd" else sft_module.train_sft(cfg)
    finally:
        module.clip_and_step = real
    if not main:
        return None
    result = {
        "metrics": json.loads((Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()[0]),
        "fsdp_units": grads.pop("fsdp_units"),
        "grads": grads,
        "params": _weights(final),
    }
    if (final / "teacher").exists():
        result["teacher"] = _weights(final / "teacher")
    return result


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in load_vlm(path, dtype=torch.float32, device="cpu")[0].named_parameters()}


def fsdp2_launch_env() -> dict[str, str]:
    """The FSDP settings `accelerate launch --config_file configs/accelerate/fsdp2.yaml` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", str(WORLD), "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def _force_fsdp(env: dict[str, str]) -> None:
    """accelerate turns FSDP on only with GPUs, but its FSDP2 code runs over gloo on CPU all the
    same: build its FSDP plugin from the settings configs/accelerate/fsdp2.yaml launches with, and
    set its distributed type by hand in both of its process-wide states, so the sharded paths
    (FSDP2 units, the teacher sharded like the student, gathered generation, the full-state export,
    the sharded optimizer checkpoint) run here."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from zoomless.train import common

    os.environ.update(env)
    real = common.make_accelerator

    def make(device: str, dtype: str):
        accelerator = real(device, dtype)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
        for state in (PartialState, AcceleratorState):
            state._shared_state["distributed_type"] = DistributedType.FSDP
        return accelerator

    common.make_accelerator = make


def _extras(cfg: OPDConfig, main: bool) -> dict[str, Any] | None:
    """Two steps sampled by the real HF engine (under FSDP from the gathered weights), and a run
    resumed from the first step's checkpoint (under FSDP: sharded optimizer state) ends where they end."""
    import shutil

    import torch.distributed as dist

    out = Path(cfg.out_dir).parent / "extras"
    steps = dict(max_steps=2, max_new_tokens=4, save_every=1)
    straight = opd_module.train_opd(cfg.model_copy(update={"out_dir": out / "a", **steps}))
    if main:
        shutil.copytree(out / "a" / "checkpoint-000001", out / "b" / "checkpoint-000001")
    dist.barrier()
    resumed = opd_module.train_opd(cfg.model_copy(update={"out_dir": out / "b", "resume": True, **steps}))
    if not main:
        return None
    result = {"hf_metrics": [json.loads(line) for line in (out / "a" / "metrics.jsonl").read_text().splitlines()]}
    for sub in ("", "teacher"):
        a, b = _weights(straight / sub), _weights(resumed / sub)
        result[f"resume_equal/{sub or 'student'}"] = all(torch.equal(a[k], b[k]) for k in a)
    return result


def _worker(rank: int, world: int, port: int, model: str, data: str, out: str, env: dict) -> None:
    """DDP first, then (in the same processes, to start them once) accelerate's FSDP2 paths."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    results = {}
    for mode in ("ddp", "fsdp"):
        if mode == "fsdp":
            _force_fsdp(env)
        configs = _configs(Path(model), Path(data), Path(out) / mode)
        results[mode] = {recipe: _one_step(recipe, cfg, main=rank == 0) for recipe, cfg in configs.items()}
        results[mode]["extras"] = _extras(configs["opd"], main=rank == 0)
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_5"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def assets(tmp_path_factory, family) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    SIZES.setdefault(TIED, dataclasses.replace(SIZES["test"], tie_embeddings=True))
    model = build_tiny_vlm(root / "model", family=family, size=TIED, seed=0)
    samples = read_samples(generate_split(root / "world", "train", 4, seed=0, size=448, progress=False))
    order = DataIterator(len(samples), 4, seed=0).global_batch()
    marked = order[-1]  # the last of the global batch: on the second process
    samples[marked] = samples[marked].with_(question=samples[marked].question + DROP)
    return model, write_samples(samples, root / "data.jsonl")


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("one")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {recipe: _one_step(recipe, cfg, main=True) for recipe, cfg in _configs(*assets, root).items()}
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def spawned(assets, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("two")
    args = (WORLD, _free_port(), str(assets[0]), str(assets[1]), str(out), fsdp2_launch_env())
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="spawn")
    return torch.load(out / "results.pt", weights_only=False)


@pytest.fixture(params=["ddp", "fsdp"])
def double(request, spawned) -> dict[str, dict]:
    return spawned[request.param]


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
    den = sum(float(b[k].double().pow(2).sum()) for k in a) ** 0.5
    return num / den


@pytest.mark.parametrize("recipe", ["opd", "sft"])
def test_two_processes_give_the_single_process_step(single, double, family: str, recipe: str) -> None:
    one, two = single[recipe], double[recipe]
    # Qwen3.5's linear attention sums its gradients in another order when the batch is split: its
    # A_log gradient moves by 2.6e-5 (relative) between a batch and its rows one by one, in one process
    slack = 10 if family == "qwen3_5" else 1
    loss = "jsd" if recipe == "opd" else "loss"
    assert two["metrics"][loss] == pytest.approx(one["metrics"][loss], rel=1e-5)
    assert two["metrics"]["tokens"] == one["metrics"]["tokens"]  # the union of the slices is the batch
    assert two["metrics"]["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=1e-5 * slack)
    assert len(one["grads"]) == len(one["params"])  # every weight got a gradient
    assert _relative_error(two["grads"], one["grads"]) < 1e-5 * slack
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4 * slack,
                                   atol=1e-5 * slack * float(g.abs().max()) + 1e-12)
    for name, p in one["params"].items():  # one AdamW step of lr 1e-3 moves each weight by ~1e-3
        torch.testing.assert_close(two["params"][name], p, rtol=0, atol=1e-5)
    if recipe == "opd":
        assert one["metrics"]["rollouts"] == two["metrics"]["rollouts"] == 8
        assert one["metrics"]["dropped"] == two["metrics"]["dropped"] == 1
        for name, t in one["teacher"].items():  # the EMA teacher moved the same way
            torch.testing.assert_close(two["teacher"][name], t, rtol=0, atol=1e-6)


def test_the_step_moved_the_weights(single, assets) -> None:
    base = dict(load_vlm(assets[0], dtype=torch.float32, device="cpu")[0].named_parameters())
    for recipe in ("opd", "sft"):
        params = single[recipe]["params"]
        assert sum(not torch.equal(params[n], p) for n, p in base.items()) > len(base) // 2, recipe


def test_resume_is_exact_and_sampling_runs(double) -> None:
    extras = double["extras"]
    assert extras["resume_equal/student"] and extras["resume_equal/teacher"]
    for m in extras["hf_metrics"]:
        assert m["rollouts"] == 8 and m["tokens"] > 0 and m["skipped"] == 0


def test_fsdp_shards_every_layer(double) -> None:
    if double["opd"]["fsdp_units"] == 0:
        pytest.skip("DDP")
    # 2 decoder layers, 2 vision blocks, and the root (which holds the tied embedding and head)
    assert double["opd"]["fsdp_units"] == 5 and double["sft"]["fsdp_units"] == 5

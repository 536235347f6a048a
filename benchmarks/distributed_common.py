"""What the two data-parallel benchmarks share: model shapes, a fixed-rollout engine, the data, and
launching this script again under `accelerate launch` on N processes.

Imported by benchmarks/distributed_check.py and benchmarks/distributed_throughput.py (the script's
folder is on sys.path, also under `accelerate launch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import traceback
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from zoomless.engines.base import Generation

ROOT = Path(__file__).resolve().parents[1]
# The real sizes (config.json of the released checkpoints), randomly initialised.
QWEN25_VL_3B = dict(
    vocab=151936, vision_depth=32, vision_hidden=1280, vision_heads=16, vision_intermediate=3420,
    fullatt_blocks=[7, 15, 23, 31], text_layers=36, text_hidden=2048, text_heads=16, text_kv_heads=2,
    text_intermediate=11008, tie_embeddings=True,
)
QWEN3_VL_4B = dict(  # Qwen3-VL-4B-Instruct
    vocab=151936, vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
    deepstack_indexes=[5, 11, 17], position_embeddings=2304, text_layers=36, text_hidden=2560, text_heads=32,
    text_kv_heads=8, text_head_dim=128, mrope_section=[24, 20, 20], text_intermediate=9728, tie_embeddings=True,
)
REAL_SHAPES = {"qwen2.5-vl-3b": ("qwen2_5_vl", QWEN25_VL_3B), "qwen3-vl-4b": ("qwen3_vl", QWEN3_VL_4B)}
SHAPES = ("test", "small", "base", *REAL_SHAPES)  # the first three: tiny sizes (zoomless.models.tiny)


# ----------------------------------------------------------------------------- model and data


def shape_family(shape: str, family: str = "qwen2_5_vl") -> str:
    """The model family of `shape`: a real shape's own, `family` for a tiny size."""
    return REAL_SHAPES[shape][0] if shape in REAL_SHAPES else family


def build_model(out: Path, shape: str, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """A randomly initialised Qwen-VL directory of `shape` (a tiny size of `family`, or a real
    model's sizes), with the offline tokenizer and processor; reused when it already exists."""
    from zoomless.models import tiny

    family = shape_family(shape, family)
    if (out / "config.json").exists():
        check_reused(out, shape, family)
        return out
    if shape not in REAL_SHAPES:
        return tiny.build_tiny_vlm(out, family=family, size=shape, seed=seed)
    return build_shaped(out, shape, seed)


def check_reused(out: Path, shape: str, family: str) -> None:
    """Refuse a model directory left by a run of another shape (the work folders are reused)."""
    from zoomless.models import tiny

    text = json.loads((out / "config.json").read_text())
    s = REAL_SHAPES[shape][1] if shape in REAL_SHAPES else dataclasses.asdict(tiny.SIZES[shape])
    found = (text.get("model_type"), text["text_config"]["hidden_size"], text["text_config"]["num_hidden_layers"])
    if found != (family, s["text_hidden"], s["text_layers"]):
        raise ValueError(f"{out} holds a {found[0]} model of hidden size {found[1]} and {found[2]} layers, not {shape} "
                         f"({family}): remove it or pass another --work")


def shaped_config(shape: str, tokenizer: Any) -> Any:
    """The architecture of a real shape (sizes above) wired to `tokenizer`'s special token ids."""
    from zoomless.models import tiny

    family, s = REAL_SHAPES[shape]
    size = tiny.TinySize(
        s["vocab"], s["vision_depth"], s["vision_hidden"], s["vision_heads"], s["text_layers"], s["text_hidden"],
        s["text_heads"], s["text_kv_heads"], s["text_intermediate"], tie_embeddings=s["tie_embeddings"],
    )
    tiny.SIZES.setdefault(shape, size)
    config = tiny.make_config(family, shape, tokenizer)
    config.text_config.vocab_size = s["vocab"]  # rows past the tokenizer's length are never sampled
    config.vision_config.intermediate_size = s["vision_intermediate"]
    if family == "qwen2_5_vl":
        config.vision_config.fullatt_block_indexes = s["fullatt_blocks"]
    else:  # Qwen3's head_dim is not hidden / heads (make_config's: 80 at 4B) but 128
        config.text_config.head_dim = s["text_head_dim"]
        config.text_config.rope_parameters["mrope_section"] = s["mrope_section"]
        config.vision_config.num_position_embeddings = s["position_embeddings"]
        config.vision_config.deepstack_visual_indexes = s["deepstack_indexes"]
    return config


def model_class(config: Any) -> Any:
    """The HF model class of a Qwen2.5-VL or Qwen3-VL config."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    return {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}[
        config.model_type]


def build_shaped(out: Path, shape: str, seed: int = 0) -> Path:
    """Random weights of a real shape (initialised on the GPU when there is one, saved in bf16:
    training loads them in fp32)."""
    from transformers import GenerationConfig

    from zoomless.models import tiny
    from zoomless.models import tokenizer as tk

    family = REAL_SHAPES[shape][0]
    tokenizer = tk.build_tokenizer(4096)
    unit = tiny.PATCH_SIZE[family] * 2  # a merged token's side in pixels
    processor = tiny.make_processor(family, tokenizer, unit * unit * 4, 896 * 896)
    config = shaped_config(shape, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config)(config).to(torch.bfloat16)
    eos, pad = tokenizer.convert_tokens_to_ids(tk.IM_END), tokenizer.convert_tokens_to_ids(tk.ENDOFTEXT)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    if device == "cuda":  # this process waits while the runs train: give the GPU memory back
        torch.cuda.empty_cache()
    return out


def parameter_count(config: Any) -> int:
    """Parameters of a Qwen-VL config, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_data(out: Path, n: int, size: int, seed: int = 0) -> Path:
    """`n` ZoomWorld samples at `size` pixels (reused when they exist)."""
    from zoomless.world.generate import generate_split

    path = out / "train.jsonl"
    if path.exists():
        return path
    return generate_split(out, "train", n, seed=seed, size=size, progress=False)


# ----------------------------------------------------------------------------- fixed rollouts


class FixedEngine:
    """Answers each conversation with `n` fixed responses derived from its question text: "The
    answer is X." (X a letter drawn from the text, so GRPO rewards vary) followed by `length`
    filler tokens. Any process asking about a prompt gets the same responses, so a batch split
    over processes distills and rewards exactly what the whole batch does on one."""

    name = "fixed"

    def __init__(self, processor: Any, length: int = 0) -> None:
        self.tokenizer = processor.tokenizer
        self.length = length
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(self, conversations: Sequence[Any], params: Any) -> list[list[Generation]]:
        out = []
        for conv in conversations:
            question = conv[-1]["content"][-1]["text"]
            h = zlib.crc32(question.encode())
            gens = []
            for j in range(params.n):
                text = f"The answer is {'ABCD'[(h + j) % 4]}."
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += [100 + (h + 7 * j + 3 * k) % 50 for k in range(self.length)] + [self.eos]
                gens.append(Generation(text=text, token_ids=ids, finish_reason="stop"))
            out.append(gens)
        return out


# ----------------------------------------------------------------------------- launching


def launch(
    script: Path, processes: int, script_args: Sequence[str], *, cpu: bool, accelerate_config: Path | None = None,
    log: Path | None = None, timeout: float | None = None,
) -> None:
    """Run `script` again on `processes` processes, with this interpreter and `src` on the path:
    `accelerate launch` on GPUs (one process per GPU; FSDP2 with `accelerate_config`), torchrun
    on CPU (processes over gloo: accelerate launches several CPU processes only through MPI; an
    FSDP config is emulated, `emulate_fsdp_on_cpu`). Raise CalledProcessError if it fails, and
    TimeoutExpired if it runs past `timeout` seconds (the launcher is stopped, its processes with it).

    With `log`, the launcher's output (every process's stdout and stderr) is also written there."""
    port = str(free_port())
    env = dict(os.environ)
    if cpu:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", port]
        if accelerate_config is not None and processes > 1:
            env.update(fsdp_launch_env(accelerate_config, processes))
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", port]
        if accelerate_config is not None:
            cmd += ["--config_file", str(accelerate_config)]
        elif processes > 1:
            cmd += ["--multi_gpu"]
    cmd += [str(script), *script_args]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    # NVLink multicast (NVLS) off: on shared GPU hosts a program using it can take every GPU of the
    # host out of service; plain NCCL rings and trees serve these message sizes as well.
    env["NCCL_NVLS_ENABLE"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    print("$", " ".join(cmd), flush=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log is not None else contextlib.nullcontext() as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        pump = threading.Thread(target=_tee, args=(proc.stdout, f), daemon=True)
        pump.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            pump.join()
            raise
        pump.join()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def _tee(stream: Any, log: Any) -> None:
    """The launcher's output, line by line as it comes, to the console and to the log (if any)."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        if log is not None:
            log.write(line)
            log.flush()


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launcher: SIGTERM, which it passes on to its processes; SIGKILL after a minute."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fsdp_launch_env(config: Path, processes: int) -> dict[str, str]:
    """The FSDP settings `accelerate launch --config_file config` gives its processes (none for a
    config without FSDP)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", str(processes), "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def emulate_fsdp_on_cpu() -> None:
    """In a CPU worker launched with an FSDP config: accelerate turns FSDP on only with GPUs, but its
    FSDP2 code runs over gloo all the same. Every Accelerator the run makes gets the FSDP plugin the
    launcher's settings describe (with bf16 gathered weights for `dtype: bfloat16`, as on GPUs) and
    FSDP as its distributed type, so the sharded code paths run (as in tests/test_distributed.py)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from zoomless.train import common

    real = common.make_accelerator

    def make(device: str, dtype: str) -> Any:
        accelerator = real(device, dtype)
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
        if dtype == "bfloat16":
            plugin.set_mixed_precision("bf16")
        accelerator.state.fsdp_plugin = plugin
        for state in (PartialState, AcceleratorState):
            state._shared_state["distributed_type"] = DistributedType.FSDP
        return accelerator

    common.make_accelerator = make


@contextlib.contextmanager
def failure_log(folder: Path) -> Iterator[None]:
    """Around a worker: if it raises, its traceback goes to `folder/error-rank{RANK}.txt` (and to
    stderr, as always), so a failed multi-process run can be read afterwards."""
    try:
        yield
    except BaseException:
        folder.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        (folder / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))

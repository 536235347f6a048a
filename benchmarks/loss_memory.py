"""Extra peak memory of one loss step over the language-model head: Vision-OPD's chunked top-k JSD
against a plain cross-entropy step and a naive full-logits JSD.

    PYTHONPATH=src python benchmarks/loss_memory.py                      # GPU: 152K vocab, 8 x 1024 tokens
    PYTHONPATH=src python benchmarks/loss_memory.py --device cpu --vocab 32768 --tokens 1024 --hidden 256

Every method starts from the same inputs: the response hidden states [N, H] (a leaf that needs grad,
standing in for the backbone's output), the LM head weight [V, H] (fp32, as trained) and, for the
JSD, the teacher's hidden states [N, H]. A step is forward + backward; "extra peak" is the peak
memory during the step minus what was allocated before it (weights and inputs), so the head's
weight gradient (V x H fp32) counts for every method.

  chunked top-k JSD  zoomless's Vision-OPD path: student top-k ids and teacher log-probs at them in
                     no-grad chunks, then the JSD chunk by chunk with recomputation (train/losses.py)
  chunked CE         zoomless's SFT path (chunked_logprobs)
  plain CE           logits = head(h) for all tokens, F.cross_entropy: what a standard step does
  naive JSD          the same top-k JSD from full [N, V] student and teacher logits

CUDA: torch.cuda.max_memory_allocated, with bf16 autocast by default (as training runs). CPU:
zoomless.train.memory.PeakTensorMemory (tensor bytes followed op by op; fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F

from zoomless.train.losses import (
    chunked_logprobs,
    chunked_map,
    gather_logprobs,
    topk_generalized_jsd,
    topk_ids,
)
from zoomless.train.memory import PeakTensorMemory

Inputs = dict[str, torch.Tensor]
MiB = 2**20


def make_inputs(
    vocab: int, tokens: int, hidden: int, device: torch.device, seed: int = 0
) -> tuple[torch.nn.Linear, Inputs]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * hidden**-0.5)
    inputs = {
        "h": torch.randn(tokens, hidden, generator=g).to(device).requires_grad_(True),
        "h_teacher": torch.randn(tokens, hidden, generator=g).to(device),
        "y": torch.randint(0, vocab, (tokens,), generator=g).to(device),
    }
    return head, inputs


# ----------------------------------------------------------------------------- the steps


def chunked_jsd_step(head: torch.nn.Linear, x: Inputs, topk: int, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        ids = chunked_map(x["h"].detach(), head, lambda z: topk_ids(z, topk), chunk_size=chunk)
        t_logp = chunked_map(x["h_teacher"], head, lambda z, i: gather_logprobs(z, i), ids, chunk_size=chunk)
    jsd = chunked_map(x["h"], head, lambda z, i, t: topk_generalized_jsd(z, i, t), ids, t_logp, chunk_size=chunk)
    return jsd.mean()


def chunked_ce_step(head: torch.nn.Linear, x: Inputs, topk: int, chunk: int) -> torch.Tensor:
    return -chunked_logprobs(x["h"], head, x["y"], chunk_size=chunk).mean()


def plain_ce_step(head: torch.nn.Linear, x: Inputs, topk: int, chunk: int) -> torch.Tensor:
    return F.cross_entropy(head(x["h"]).float(), x["y"])


def naive_jsd_step(head: torch.nn.Linear, x: Inputs, topk: int, chunk: int) -> torch.Tensor:
    z = head(x["h"]).float()
    ids = topk_ids(z.detach(), topk)
    with torch.no_grad():
        t_logp = torch.log_softmax(head(x["h_teacher"]).float(), -1).gather(-1, ids)
    s = torch.log_softmax(z, -1).gather(-1, ids)
    s = torch.cat([s, torch.log1p(-s.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))], -1)
    t = torch.cat([t_logp, torch.log1p(-t_logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))], -1)
    m = torch.logaddexp(s, t) - torch.log(torch.tensor(2.0, device=s.device))
    return (0.5 * (s.exp() * (s - m)).sum(-1) + 0.5 * (t.exp() * (t - m)).sum(-1)).mean()


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "chunked top-k JSD": chunked_jsd_step,
    "chunked CE": chunked_ce_step,
    "plain CE": plain_ce_step,
    "naive JSD": naive_jsd_step,
}


# ----------------------------------------------------------------------------- measuring


def measure(step: Callable[..., torch.Tensor], head: torch.nn.Linear, x: Inputs, topk: int, chunk: int,
            device: torch.device, amp: torch.dtype | None) -> tuple[int, float]:
    """(extra peak bytes, seconds) of one forward + backward."""
    head.weight.grad = None
    x["h"].grad = None
    cast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def run() -> None:
        with cast:
            loss = step(head, x, topk, chunk)
        loss.backward()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        t0 = time.perf_counter()
        with PeakTensorMemory() as tracker:
            run()
        seconds = time.perf_counter() - t0
        peak = tracker.peak
    head.weight.grad = None
    x["h"].grad = None
    return peak, seconds


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, default=152064, help="vocabulary size (Qwen2.5-VL: 152064)")
    ap.add_argument("--tokens", type=int, default=8 * 1024, help="response tokens in the step (8 x 1024)")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (Qwen2.5-VL-3B: 2048)")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=512, help="rows per LM-head chunk (logits_chunk_size)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="autocast dtype; auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="run each step once before measuring (CUDA: kernels and workspaces)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    amp = None if dtype == torch.float32 else dtype
    head, x = make_inputs(args.vocab, args.tokens, args.hidden, device)

    rows = []
    for name in args.methods:
        if args.warmup and device.type == "cuda":
            measure(METHODS[name], head, x, args.topk, args.chunk, device, amp)
        peak, seconds = measure(METHODS[name], head, x, args.topk, args.chunk, device, amp)
        rows.append({"method": name, "extra_peak_bytes": peak, "seconds": seconds})

    ce = next((r["extra_peak_bytes"] for r in rows if r["method"] == "plain CE"), None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tensor bytes)"
    print(f"{where}  V={args.vocab}  N={args.tokens} tokens  H={args.hidden}  k={args.topk}  "
          f"chunk={args.chunk}  compute={str(dtype).removeprefix('torch.')}")
    print(f"head weight {args.vocab * args.hidden * 4 / MiB:,.0f} MiB fp32; "
          f"one [N, V] fp32 tensor {args.tokens * args.vocab * 4 / MiB:,.0f} MiB")
    print(f"{'method':<20}{'extra peak MiB':>16}{'x plain CE':>12}{'ms':>10}")
    for r in rows:
        ratio = f"{r['extra_peak_bytes'] / ce:.2f}" if ce else "-"
        r["ratio_to_plain_ce"] = r["extra_peak_bytes"] / ce if ce else None
        print(f"{r['method']:<20}{r['extra_peak_bytes'] / MiB:>16,.0f}{ratio:>12}{r['seconds'] * 1e3:>10,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": where, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Performance at the Qwen2.5-VL-3B shape (or Qwen3-VL-4B's, `--shape qwen3-vl-4b`) on one GPU
(issue 9): training steps, rollout generation, single pass vs the tool loop. Random weights of the
real sizes; nothing is downloaded.

    # one H100 80GB, about 7 minutes; JSON, a markdown table and the profiles land in OUT
    PYTHONPATH=src python benchmarks/perf_3b.py --out OUT
    # CPU smoke test of every part on a tiny model (under a minute); with --shape qwen3-vl-4b, a
    # tiny Qwen3-VL
    PYTHONPATH=src python benchmarks/perf_3b.py --out /tmp/perf --tiny

Parts (`--parts`, each in its own process so that one's memory or failure does not reach the next):
  train     Vision-OPD and GRPO steps, baseline vs variants, torch.profiler (perf_3b_train.py):
            `--prompts` x `--rollouts` responses of `--response-len` tokens on ~1,000-token images.
  toolloop  single pass vs the Thinking-with-Images loop (eval/tool_loop.py), greedy, same model and
            samples. A random model never writes a tool call, so the loop runs with oracle_box and
            an engine wrapper that replaces every first reply (generated and timed as usual) with a
            zoom call: each sample does exactly one zoom round (two model calls).
  generate  rollout throughput of the HF engine (engines/hf.py) at batch `--gen-batches`, for the
            dynamic cache, the static cache, and the static cache compiled (CUDA only), against the
            memory-bandwidth bound: a decode step reads every language-model weight once, so
            steps/s <= bandwidth / weight bytes and tokens/s <= batch x that (a second bound adds
            the KV-cache reads). Sampling at T=1, as rollouts; decode steps/s is measured as
            (N - 1) / (time of N new tokens - time of 1 new token), prefill excluded.

MFU = model FLOPs / step time / the GPU's dense bf16 peak (989 TFLOP/s for H100 SXM and H200,
`--peak-tflops` otherwise); perf_3b_measure.py says what is counted. A matmul probe gives what the
card reaches on plain bf16 matmuls, a copy probe its memory bandwidth.

Writes OUT/results.json (everything), OUT/results.md (the tables) and OUT/profile_*.txt (top ops);
the scratch (model, data, per-part JSON) goes to `--work`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_common as dc  # noqa: E402
import perf_3b_measure as pm  # noqa: E402

PARTS = ("train", "toolloop", "generate")  # the part whose time is least certain (compilation) last
GEN_VARIANTS = {  # HFEngine options
    "dynamic": {},
    "static": {"cache_implementation": "static", "compile": False},
    "static+compile": {"cache_implementation": "static"},  # transformers compiles the decode step on CUDA
}
TRAIN_VARIANTS = ("hf-plain", "opd", "grpo", "opd-compiled", "opd-master", "grpo-master", "opd-master-compiled-parts", "opd-master-compiled-layers",
                  "opd-master-compiled", "grpo-master-compiled", "opd-master-compiled-sync", "grpo-master-compiled-sync",
                  "opd-master-compiled-keep", "opd-master-compiled-vkeep", "grpo-master-compiled-vkeep",
                  "opd-master-compiled-tower", "grpo-master-compiled-tower",
                  "opd-master-compiled-tower-rollout", "opd-master-compiled-tower-rollout-static",
                  "opd-master-compiled-tower-keep", "grpo-master-compiled-tower-keep", "opd-master-compiled-ema16",
                  "opd-master-compiled-vkeep-ema16", "grpo-bf16-nogc", "opd-bf16", "opd-bf16-nogc",
                  "opd-bf16-nogc-frozen-vision", "opd-bf16-aligned", "opd-bf16-aligned-fused",
                  "opd-bf16-aligned-fused-compiled")  # perf_3b_train.py runs them in this order
# Dense bf16 peak (TFLOP/s) and memory bandwidth (TB/s) from the vendor's data sheets, first match wins.
SPECS = (("H200", 989.4, 4.8), ("H100 PCIe", 756.0, 2.0), ("H100 NVL", 835.0, 3.9), ("H100", 989.4, 3.35),
         ("A100", 312.0, 2.0))
PROFILE_TOKENS = 32  # new tokens of the profiled generate call
ZOOM_CALL = '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 1000, 1000]}}\n</tool_call>'


# ----------------------------------------------------------------------------- setup


def device_info(a: argparse.Namespace) -> dict[str, Any]:
    """The device, the software, the peak numbers MFU and the bound use, and two probes."""
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "device": "cpu", "peak_tflops": a.peak_tflops, "bandwidth_tbs": a.bandwidth_tbs,
                            "host_cpu": host_cpu(), "probe_host_dispatch_us": dispatch_probe()}
    if not torch.cuda.is_available():
        return info
    name = torch.cuda.get_device_name()
    spec = next(((f, b) for key, f, b in SPECS if key in name), (None, None))
    info.update(device=name, peak_tflops=a.peak_tflops or spec[0], bandwidth_tbs=a.bandwidth_tbs or spec[1],
                total_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    info.update(probe_matmul_tflops=matmul_probe(), probe_copy_tbs=copy_probe())
    torch.cuda.empty_cache()
    return info


def host_cpu() -> str:
    """The host's CPU model (/proc/cpuinfo), where the host can be what bounds a step."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dispatch_probe(n: int = 20_000) -> float:
    """Microseconds per small eager CPU op (Python, the dispatcher, autograd bookkeeping): the host
    work a step repeats thousands of times. The compiled 3B step keeps its GPU busy about 70% of the
    time, and two H100s ran it 10% apart (sessions 17-18), the faster one with the slower matmul
    probe: the host is the suspect, which this probe and `host_cpu` record."""
    x = torch.ones(4, requires_grad=True)
    for _ in range(1000):
        x.mul(1.0001)
    t0 = time.perf_counter()
    for _ in range(n):
        x.mul(1.0001)
    return (time.perf_counter() - t0) / n * 1e6


def matmul_probe(n: int = 8192) -> float:
    """TFLOP/s of a bf16 n x n x n matmul."""
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / timed_cuda(lambda: x @ x) / 1e12


def copy_probe(nbytes: int = 2**30) -> float:
    """TB/s of a device-to-device copy, bytes read plus bytes written."""
    x = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    return 2 * nbytes / timed_cuda(x.clone) / 1e12


def timed_cuda(fn: Any, repeat: int = 10) -> float:
    """Mean seconds of `fn` on the GPU, after three warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def paths(a: argparse.Namespace) -> dict[str, Path]:
    return {"model": a.work / "model", "data": a.work / "data", "train_data": a.work / "data" / "train_batch.jsonl"}


def prepare(a: argparse.Namespace) -> None:
    """The random model and the ZoomWorld samples (both reused when they exist); the training data
    is exactly one batch of prompts, so every training step runs the same sequences."""
    p = paths(a)
    t0 = time.perf_counter()
    dc.build_model(p["model"], a.shape, family=a.family)
    data = dc.build_data(p["data"], max(a.prompts, a.tool_samples, 8), a.image_size)
    lines = data.read_text().splitlines()[: a.prompts]
    p["train_data"].write_text("".join(line + "\n" for line in lines))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the model was initialised on the GPU
    print(f"[setup] model and data ready in {time.perf_counter() - t0:.1f} s", flush=True)


def samples_of(a: argparse.Namespace) -> list[Any]:
    from zoomless.sample import read_samples

    return read_samples(paths(a)["data"] / "train.jsonl")


def full_conversation(a: argparse.Namespace, sample: Any) -> Any:
    from zoomless.train.views import view_conversation

    return view_conversation(sample, "full", "mcq", max_pixels=a.max_pixels, crop_margin=0.25, zoom=2.0)


def load_bf16(a: argparse.Namespace) -> tuple[Any, Any]:
    from zoomless.models.loading import load_vlm

    return load_vlm(paths(a)["model"], dtype="auto", device="auto")  # bf16 on a GPU, fp32 on the CPU


# ----------------------------------------------------------------------------- generation


def timed_generate(engine: Any, convs: list[Any], params: Any, cuda: bool) -> tuple[float, int]:
    """Seconds of one `generate` call and the tokens it generated."""
    before = engine.stats["generated_tokens"]
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(convs, params)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, int(engine.stats["generated_tokens"] - before)


def generation_row(
    a: argparse.Namespace, engine: Any, convs: list[Any], prompt: int, compiled: bool, weight_bytes: int, config: Any,
    cuda: bool, bandwidth: float | None,
) -> dict[str, Any]:
    """One batch size: end-to-end tokens/s, decode steps/s, and both bandwidth bounds."""
    from zoomless.engines.base import SamplingParams

    batch, n = len(convs), a.gen_tokens
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_new_tokens=n, seed=0)
    row: dict[str, Any] = {"batch": batch, "new_tokens": n}
    if compiled:  # the first call of a new shape compiles
        row["first_call_s"] = timed_generate(engine, convs, params, cuda)[0]
    full, tokens = timed_generate(engine, convs, params, cuda)
    one, _ = timed_generate(engine, convs, dataclasses.replace(params, max_new_tokens=1), cuda)
    steps_s = (n - 1) / (full - one) if full > one else None
    row.update(seconds=full, prefill_s=one, generated_tokens=tokens, tokens_per_s=tokens / full,
               decode_steps_per_s=steps_s, decode_tokens_per_s=steps_s * batch if steps_s else None,
               prompt_tokens=prompt)
    if bandwidth and steps_s:
        bound = bandwidth * 1e12 / weight_bytes
        kv = pm.kv_bytes_per_step(config, batch, prompt + n / 2)
        bound_kv = bandwidth * 1e12 / (weight_bytes + kv)
        row.update(bound_steps_per_s=bound, bound_tokens_per_s=bound * batch, ratio_to_bound=steps_s / bound,
                   bound_with_kv_steps_per_s=bound_kv, ratio_to_bound_with_kv=steps_s / bound_kv)
    return row


def run_generate(a: argparse.Namespace, info: dict[str, Any], save: Any) -> dict[str, Any]:
    from zoomless.engines.hf import HFEngine
    from zoomless.models.loading import encode_conversations

    model, processor = load_bf16(a)
    cuda = model.device.type == "cuda"
    samples = samples_of(a)
    weight_bytes = pm.decode_bytes(model)
    out: dict[str, Any] = {"weight_bytes_per_decode_step": weight_bytes, "bandwidth_tbs": info.get("bandwidth_tbs"),
                           "variants": {}}
    for name in a.gen_variants:
        compiled = name == "static+compile"
        if compiled and not cuda:
            out["variants"][name] = {"skipped": "transformers compiles the decode step only on GPUs"}
            continue
        print(f"[generate] {name} ...", flush=True)
        rows = []
        try:
            for batch in a.gen_batches:
                engine = HFEngine(model, processor, batch_size=batch, **GEN_VARIANTS[name])
                convs = [full_conversation(a, samples[i % len(samples)]) for i in range(batch)]
                prompt = encode_conversations(processor, convs[:1])["input_ids"].shape[1]
                if not rows and not compiled:  # kernels and allocator warm before the first timing
                    timed_generate(engine, convs, _params(2), cuda)
                rows.append(generation_row(a, engine, convs, prompt, compiled, weight_bytes, model.config, cuda,
                                           info.get("bandwidth_tbs")))
                r = rows[-1]
                print(f"[generate] {name} batch {batch}: {r['tokens_per_s']:.0f} tok/s, decode "
                      f"{r['decode_steps_per_s'] or 0:.1f} steps/s"
                      + (f" = {r['ratio_to_bound']:.0%} of the bandwidth bound" if "ratio_to_bound" in r else ""),
                      flush=True)
                out["variants"][name] = {"rows": rows}
                save(out)
            if a.profile and not compiled:  # where the time of a decode step goes
                engine = HFEngine(model, processor, batch_size=a.gen_batches[0], **GEN_VARIANTS[name])
                convs = [full_conversation(a, samples[i % len(samples)]) for i in range(a.gen_batches[0])]
                p = pm.profile_call(lambda e=engine, c=convs: e.generate(c, _params(PROFILE_TOKENS)))
                out["variants"][name]["profile"] = p
                text = pm.profile_text(f"one {name} generate call, batch {len(convs)}, {PROFILE_TOKENS} new tokens "
                                       "(prefill included)", p)
                print(text, flush=True)
                (a.out / f"profile_generate_{name}.txt").write_text(text + "\n")
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the others still run
            out["variants"][name] = {"rows": rows, "error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"[generate] {name} failed: {out['variants'][name]['error'][:400]}", flush=True)
        save(out)
    return out


def _params(n: int) -> Any:
    from zoomless.engines.base import SamplingParams

    return SamplingParams(n=1, temperature=1.0, max_new_tokens=n, seed=0)


# ----------------------------------------------------------------------------- tool loop


class ZoomOnFirstTurn:
    """An engine whose first reply in each conversation is a zoom call: the wrapped engine generates
    (and is timed) as usual, then the text of a reply to a conversation without an assistant turn
    is replaced by `ZOOM_CALL`. With oracle_box the loop zooms on the evidence box."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name = f"{engine.name}+zoom-on-first-turn"

    def generate(self, conversations: Sequence[Any], params: Any) -> list[list[Any]]:
        out = self.engine.generate(conversations, params)
        return [
            gens if any(m["role"] == "assistant" for m in conv) else [dataclasses.replace(g, text=ZOOM_CALL) for g in gens]
            for conv, gens in zip(conversations, out)
        ]


def run_toolloop(a: argparse.Namespace, info: dict[str, Any], save: Any) -> dict[str, Any]:
    from zoomless.engines.hf import HFEngine
    from zoomless.eval.single_pass import evaluate
    from zoomless.eval.tool_loop import evaluate_tool_loop, speed_accuracy

    model, processor = load_bf16(a)
    samples = samples_of(a)[: a.tool_samples]
    engine = HFEngine(model, processor, batch_size=a.tool_batch)
    kw = dict(max_new_tokens=a.tool_tokens, max_pixels=a.max_pixels, batch_size=a.tool_batch, progress=False)
    evaluate(samples[: a.tool_batch], engine, views=("full",), **kw)  # warm-up: kernels, allocator, greedy path
    modes = {}
    for mode in ("single_pass", "tool_loop"):
        print(f"[toolloop] {mode} ...", flush=True)
        before = dict(engine.stats)
        t0 = time.perf_counter()
        if mode == "single_pass":
            sp = evaluate(samples, engine, views=("full",), **kw)
        else:
            tl = evaluate_tool_loop(samples, ZoomOnFirstTurn(engine), max_turns=2, oracle_box=True, **kw)
        wall = time.perf_counter() - t0
        calls = engine.stats["prompts"] - before["prompts"]
        modes[mode] = {"wall_s": wall, "samples_per_s_wall": len(samples) / wall, "model_calls": calls,
                       "generated_tokens": engine.stats["generated_tokens"] - before["generated_tokens"]}
    sa = speed_accuracy(sp, tl)
    out = {
        "samples": len(samples), "batch": a.tool_batch, "max_new_tokens": a.tool_tokens, "modes": modes,
        "speed_accuracy": sa, "tool_stats": tl.tool_stats(),
        "note": "random weights: every first reply is replaced by a zoom call (oracle_box), so each sample "
                "does one zoom round; accuracy is chance",
        "single_pass_over_tool_loop_samples_per_s": sa["speedup"],
    }
    print(f"[toolloop] single pass {sa['single_pass']['samples_per_s']:.2f} samples/s, tool loop "
          f"{sa['tool_loop']['samples_per_s']:.2f} samples/s: {sa['speedup']:.2f}x", flush=True)
    save(out)
    return out


# ----------------------------------------------------------------------------- parts and report


def run_part(a: argparse.Namespace) -> None:
    """Inside the child process of one part: run it, saving its JSON as it goes."""
    info = json.loads((a.work / "device.json").read_text())
    path = a.work / f"part-{a.part}.json"

    def save(data: dict[str, Any]) -> None:
        path.write_text(json.dumps(data, indent=2, default=str))

    if a.part == "train":
        from perf_3b_train import run_train_part

        peak = info["peak_tflops"] * 1e12 if info.get("peak_tflops") else None
        run_train_part(a, paths(a)["model"], paths(a)["train_data"], a.out, peak, save)
    elif a.part == "generate":
        run_generate(a, info, save)
    else:
        run_toolloop(a, info, save)
    # Everything is saved. Leave at once: after torch.compile, the exit waits on inductor's compile
    # workers for minutes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_part(a: argparse.Namespace, part: str, seconds_left: float | None) -> dict[str, Any]:
    """Run one part in a child process (its memory is returned to the GPU when it ends), stopped
    when `seconds_left` run out; what it saved until then is kept."""
    path = a.work / f"part-{part}.json"
    path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(dc.ROOT / "src"), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part], env=env,
                            timeout=seconds_left, check=False).returncode
        error = f"the {part} process exited with {rc}" if rc else None
    except subprocess.TimeoutExpired:
        error = f"the {part} process was stopped at the time budget (--time-budget)"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["part_seconds"] = time.perf_counter() - t0
    if error:
        result["part_error"] = error + "; the results shown are what it saved before"
    return result


def fmt(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict[str, Any]) -> str:
    d = results["device"]
    lines = [f"# perf_3b: {results['shape']} ({results.get('family', 'qwen2_5_vl')}) on {d['device']}", "",
             f"torch {d['torch']}, transformers {d['transformers']}; peak {fmt(d.get('peak_tflops'))} TFLOP/s bf16, "
             f"{fmt(d.get('bandwidth_tbs'), '.2f')} TB/s; probes: matmul {fmt(d.get('probe_matmul_tflops'))} TFLOP/s, "
             f"copy {fmt(d.get('probe_copy_tbs'), '.2f')} TB/s; host {d.get('host_cpu', '-')}, "
             f"{fmt(d.get('probe_host_dispatch_us'), '.1f')} us per small CPU op", ""]
    t = results.get("train")
    if t and "variants" in t:
        s = t["setup"]
        lines += [f"## Training step: {s['prompts']} prompt(s) x {s['rollouts']} rollouts x {s['response_tokens']} "
                  f"response tokens, {s['student_sequence_tokens']:.0f} tokens per student sequence "
                  f"(teacher {s['teacher_sequence_tokens']:.0f}), padding {s['student_padding_share']:.1%}", "",
                  "| variant | s/step (median) | mean | seq tok/s | resp tok/s | TFLOP/step | MFU | HFU | peak GiB | phases (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in t["variants"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['error']} | | | | | | | | |")
                continue
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items() if v >= 0.005)
            mean = fmt(r.get("seconds_per_step_mean"), ".2f")  # absent in older results
            lines.append(f"| {r['variant']} | {r['seconds_per_step']:.2f} | {mean} | {r['sequence_tokens_per_s']:.0f} | "
                         f"{r['response_tokens_per_s']:.0f} | {r['model_tflop_per_step']:.1f} | {fmt(r['mfu'], '.1%')} | "
                         f"{fmt(r['hfu'], '.1%')} | {fmt(r['peak_memory_gib'], '.1f')} | {phases} |")
        fc = t.get("flop_check", {})
        check = (f"matmuls {fc['analytic_over_counted_matmuls']:.3f}, attention "
                 f"{fmt(fc['analytic_over_counted_attention'], '.3f')}" if "error" not in fc else fc["error"])
        saved = t["opd_flops_saved_by_one_vision_pass_per_prompt"]
        lines += ["", f"Vision tower: {t['opd_vision_share_of_model_flops']:.0%} of an OPD step's model FLOPs; encoding "
                  f"each image once per prompt instead of once per sequence (stock transformers) saves {saved:.0%} "
                  f"of the step's FLOPs. FLOP formula / FlopCounterMode on one "
                  f"forward: {check}. Attention: {t['setup']['attention']}.", ""]
        lines += [profile_line(f"`{name}` step", p) for name, p in t.get("profiles", {}).items() if usable(p)] + [""]
    g = results.get("generate")
    if g and "variants" in g:
        lines += [f"## Rollout generation (HF engine, T=1), {g['weight_bytes_per_decode_step'] / 1e9:.2f} GB of weights "
                  "per decode step", "",
                  "| variant | batch | tok/s | decode steps/s | bound steps/s | of bound | of bound with KV | first call s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in g["variants"].items():
            for r in v.get("rows", []):
                lines.append(f"| {name} | {r['batch']} | {r['tokens_per_s']:.0f} | {fmt(r['decode_steps_per_s'], '.1f')} | "
                             f"{fmt(r.get('bound_steps_per_s'), '.0f')} | {fmt(r.get('ratio_to_bound'), '.0%')} | "
                             f"{fmt(r.get('ratio_to_bound_with_kv'), '.0%')} | {fmt(r.get('first_call_s'), '.1f')} |")
            for key in ("error", "skipped"):
                if key in v:
                    lines.append(f"| {name} | {key}: {v[key][:150]} | | | | | | |")
        lines += [""] + [profile_line(f"`{name}` generate call", v["profile"]) for name, v in g["variants"].items()
                         if usable(v.get("profile"))] + [""]
    tl = results.get("toolloop")
    if tl and "modes" in tl:
        sa = tl["speed_accuracy"]
        lines += [f"## Single pass vs tool loop ({tl['samples']} samples, batch {tl['batch']}, greedy, "
                  f"{tl['max_new_tokens']} new tokens per call; {tl['note']})", "",
                  "| mode | samples/s | model calls | generated tokens | wall s |", "|---|---:|---:|---:|---:|"]
        for mode, key in (("single_pass", "single_pass"), ("tool_loop", "tool_loop")):
            m = tl["modes"][mode]
            lines.append(f"| {mode} | {sa[key]['samples_per_s']:.2f} | {m['model_calls']} | {m['generated_tokens']} | "
                         f"{m['wall_s']:.1f} |")
        lines += ["", f"Single pass is {sa['speedup']:.2f}x the tool loop's samples/s.", ""]
    for part in PARTS:
        err = (results.get(part) or {}).get("part_error")
        if err:
            lines.append(f"**{part}**: {err}")
    return "\n".join(lines) + "\n"


def usable(profile: dict[str, Any] | None) -> bool:
    """A GPU profile (a CPU run's has no kernel times to summarise)."""
    return bool(profile) and profile.get("gpu_busy_share") is not None


def profile_line(what: str, p: dict[str, Any]) -> str:
    cats = ", ".join(f"{k} {v:.2f}" for k, v in list(p["kernel_s_by_category"].items())[:6])
    return (f"Profile of one {what}: {p['wall_s']:.2f} s, GPU busy {p['gpu_busy_share']:.0%}; kernel seconds: {cats}.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results: results.json, results.md, profile_*.txt")
    p.add_argument("--work", type=Path, default=None, help="scratch: model, data, part JSONs (default: "
                   "/tmp/zoomless-perf3b, with -SHAPE for another shape than qwen2.5-vl-3b and -tiny with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny model (the 'test' size of --shape's family) on the CPU, "
                   "every part: a smoke test")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--shape", choices=dc.SHAPES, default="qwen2.5-vl-3b", help="model shape (random weights)")
    p.add_argument("--image-size", type=int, default=896,
                   help="ZoomWorld image side (896: 1,024 image tokens in Qwen2.5-VL, 784 in Qwen3-VL)")
    p.add_argument("--max-pixels", type=int, default=896 * 896)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="training autocast")
    p.add_argument("--prompts", type=int, default=1, help="training: prompts per step")
    p.add_argument("--rollouts", type=int, default=8, help="training: responses per prompt")
    p.add_argument("--response-len", type=int, default=256, help="training: tokens per response (plus the answer)")
    p.add_argument("--micro", type=int, default=8, help="training: sequences per forward/backward")
    p.add_argument("--nogc-micro", type=int, default=2, help="without checkpointing, first try (halved on OOM)")
    p.add_argument("--uncheckpointed", type=int, default=24,
                   help="opd-master-compiled-keep: decoder layers without checkpointing, first try (halved on OOM)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 2; 1 with --tiny)")
    p.add_argument("--variants", default="", help="training variants to run, comma-separated (default: all of "
                   f"{', '.join(TRAIN_VARIANTS)})")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="no torch.profiler runs")
    p.add_argument("--gen-batches", default="8,16,32,64")
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens per generate call")
    p.add_argument("--gen-variants", default=",".join(GEN_VARIANTS))
    p.add_argument("--tool-samples", type=int, default=8)
    p.add_argument("--tool-batch", type=int, default=8)
    p.add_argument("--tool-tokens", type=int, default=64, help="new tokens per model call (single pass and each turn)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the device name)")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="memory bandwidth (default: from the device name)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; a part still running then is stopped, its saved results kept")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # set in the child process of one part
    a = p.parse_args(argv)
    a.family = dc.shape_family(a.shape)
    a.work = a.work or Path("/tmp/zoomless-perf3b" + ("" if a.shape == "qwen2.5-vl-3b" else f"-{a.shape}"))
    if a.tiny:
        a.shape, a.image_size, a.max_pixels, a.prompts, a.rollouts, a.response_len = "test", 448, 112 * 112, 2, 2, 8
        a.micro, a.nogc_micro, a.gen_batches, a.gen_tokens = 2, 2, "1,2", 4
        a.steps = a.steps or 1
        a.tool_samples, a.tool_batch, a.tool_tokens = 2, 2, 4
        a.work = a.work.with_name(a.work.name + "-tiny")
    a.steps = a.steps or 2
    a.work, a.out = a.work.resolve(), a.out.resolve()
    a.parts = [x for x in a.parts.split(",") if x]
    a.gen_batches = [int(x) for x in str(a.gen_batches).split(",")]
    a.gen_variants = [x for x in a.gen_variants.split(",") if x]
    a.variants = [x for x in a.variants.split(",") if x]
    bad = ([x for x in a.parts if x not in PARTS] + [x for x in a.gen_variants if x not in GEN_VARIANTS]
           + [x for x in a.variants if x not in TRAIN_VARIANTS])
    if bad:
        p.error(f"unknown part or variant {bad[0]!r}")
    return a


def main() -> None:
    a = parse_args()
    if a.part:
        return run_part(a)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare(a)
    info = device_info(a)
    (a.work / "device.json").write_text(json.dumps(info))
    print(f"[setup] {info}", flush=True)
    results: dict[str, Any] = {"shape": a.shape, "family": a.family, "device": info,
                               "args": {k: str(v) for k, v in vars(a).items()}}
    for part in a.parts:
        left = a.time_budget - (time.perf_counter() - t0) if a.time_budget else None
        if left is not None and left < 10:
            results[part] = {"part_error": "not run: the time budget was spent"}
        else:
            results[part] = launch_part(a, part, left)
        (a.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (a.out / "results.md").write_text(markdown(results))
    results["total_seconds"] = time.perf_counter() - t0
    (a.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + markdown(results))
    print(f"total {results['total_seconds']:.0f} s; wrote {a.out}/results.json and results.md")


if __name__ == "__main__":
    main()

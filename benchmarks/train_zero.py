"""Benchmark: ZeRO stages 0-3 side by side, 2 Ray Train workers, DeepSpeed on CPU (gloo).

In one Ray Train run, each worker builds one engine per ZeRO stage, each on its own copy of the same
LM (default: the `small` preset, ~10.7M parameters), with the trainer's own `deepspeed_config` and
LR schedule, and steps them in turn on the same seeded token batches: every stage sees the same
machine load. Reported per stage, each next to stage 0:

- model-state memory per rank: bytes of every distinct tensor storage the engine holds for
  parameters, gradients and optimizer state (Adam moments, fp32 master partitions, flat buffers),
  measured after backward and before the optimizer step, when gradients are alive; the most of the
  two ranks. DeepSpeed's communication buckets are shown apart (ZeRO-3 allocates a
  `reduce_bucket_size` = 5e8-element bucket up front). Theory: ZeRO paper, mixed-precision Adam
  (2 + 2 + 12 bytes per parameter): 1, 0.625, 0.5625, 0.5 at 2 ranks; and the same formula with
  fp32 Adam (4 + 4 + 8), which is what runs on CPU: 1, 0.75, 0.625, 0.5.
- step time (forward + backward + step, mean of the timed steps) and its ratio to stage 0;
- MFU: model FLOP/s per rank (6 N + 12 L d T per token) over the FLOP/s one worker's thread
  reaches on a plain fp32 matmul, measured in the same worker (the CPU's datasheet peak is unknown).

    .venv/bin/python benchmarks/train_zero.py [--preset small] [--seq-len 128] [--micro-batch 4] [--steps 10]

Prints a table and writes benchmarks/results/train_zero.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aigc_dist.config import DeepSpeedConfig, TrainConfig
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.train.deepspeed_config import deepspeed_config, lr_scheduler_factory

RESULTS = Path(__file__).resolve().parent / "results" / "train_zero.json"
WORKERS = 2
STAGES = (0, 1, 2, 3)
THEORY_MIXED = {0: 1.0, 1: 0.625, 2: 0.5625, 3: 0.5}  # (2 + 2 + 12/N) / 16 ... at N = 2
THEORY_FP32 = {0: 1.0, 1: 0.75, 2: 0.625, 3: 0.5}  # (4 + 4 + 8/N) / 16 ... at N = 2


def _tensors(obj: Any, seen: set[int], out: list[tuple[str, torch.Tensor]], path: str, depth: int = 0) -> None:
    """Every tensor reachable from a DeepSpeed optimizer wrapper (and the torch optimizer inside)."""
    if id(obj) in seen or depth > 5:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _tensors(value, seen, out, f"{path}[{str(key)[:16]}]", depth + 1)
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            _tensors(value, seen, out, f"{path}[{index}]", depth + 1)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            _tensors(value, seen, out, f"{path}.{key}", depth + 1)


def model_state_bytes(engine: Any) -> dict[str, int]:
    """Distinct storages held for parameters, gradients and optimizer state, and comm buckets apart."""
    found: list[tuple[str, torch.Tensor]] = []
    for name, param in engine.module.named_parameters():
        found.append((f"param {name}", param.ds_tensor if hasattr(param, "ds_tensor") else param))  # ZeRO-3 part
        if param.grad is not None:
            found.append((f"grad {name}", param.grad))
    _tensors(engine.optimizer, set(), found, "optimizer")
    storages: dict[int, tuple[str, int]] = {}
    for path, tensor in found:
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = (path, storage.nbytes())
    buckets = sum(size for path, size in storages.values() if "bucket" in path)
    return {"model_state": sum(size for _, size in storages.values()) - buckets, "comm_buckets": buckets}


def matmul_flops(size: int = 512, seconds: float = 1.0) -> float:
    """FLOP/s of fp32 matmuls on this process's threads: the practical peak of one worker."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def zero_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: an engine per ZeRO stage, each on its own copy of the same model, stepped
    in turn so that every stage sees the same machine load; returns per-stage figures on rank 0."""
    import deepspeed
    import ray.train

    torch.set_num_threads(1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank = ray.train.get_context().get_world_rank()
    micro, seq, steps, warmup = config["micro_batch"], config["seq_len"], config["steps"], 2
    train = TrainConfig(micro_batch_size=micro, max_steps=100, warmup_steps=0, lr=1e-4)
    lm = lm_config_from_preset(config["preset"], max_position_embeddings=seq)
    engines = {}
    for stage in STAGES:
        torch.manual_seed(0)
        model = LlamaLM(lm)
        ds = DeepSpeedConfig(zero_stage=stage, zero3_persistence_threshold=0)
        engines[stage], *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), lr_scheduler=lr_scheduler_factory(train),
            config=deepspeed_config(train, ds, world_size=WORKERS, on_gpu=False),
        )  # fmt: skip
    params = LlamaLM(lm).num_parameters()
    batches = torch.Generator().manual_seed(rank)
    times: dict[int, list[float]] = {stage: [] for stage in STAGES}
    state: dict[int, dict[str, int]] = {}
    for step in range(warmup + steps + 1):
        ids = torch.randint(0, 256, (micro, seq + 1), generator=batches)  # the same batch for every stage
        for stage, engine in engines.items():
            dist.barrier()
            start = time.perf_counter()
            _, loss = engine(ids[:, :-1], targets=ids[:, 1:])
            engine.backward(loss)
            if step == warmup:  # gradients are alive now: the peak of model state; this step is not timed
                state[stage] = model_state_bytes(engine)
            engine.step()
            if step > warmup:
                times[stage].append(time.perf_counter() - start)
    peak = matmul_flops()
    figures = torch.tensor(
        [[state[s]["model_state"], state[s]["comm_buckets"], sum(times[s]) / len(times[s])] for s in STAGES],
        dtype=torch.float64,
    )
    worst = figures.clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # memory: the rank holding most
    dist.all_reduce(figures)  # time: the mean of the ranks
    matmul = torch.tensor([peak], dtype=torch.float64)
    dist.all_reduce(matmul)
    if rank != 0:
        return None
    return {
        "params": params,
        "matmul_flops": matmul.item() / WORKERS,
        # per rank: 6 N per token for the weights, 12 L (H hd) T for attention scores and values
        "model_flops_per_step": (6 * params + 12 * lm.num_hidden_layers * lm.num_attention_heads * lm.head_dim
                                 * seq) * micro * seq,
        "stages": {
            stage: {
                "model_state_bytes": int(worst[i, 0]),
                "comm_bucket_bytes": int(worst[i, 1]),
                "step_s": figures[i, 2].item() / WORKERS,
            }
            for i, stage in enumerate(STAGES)
        },
    }


def run_stages(args: argparse.Namespace) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    config = {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.steps}
    trainer = TorchTrainer(
        zero_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"train-zero-{int(time.time())}", storage_path="/tmp/aigc-bench"),
    )  # fmt: skip
    return trainer.fit().return_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", default="small", help="LM preset (tiny, small, base)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage (after 3 untimed)")
    args = parser.parse_args()

    import deepspeed
    import ray

    ray.init(num_cpus=max(WORKERS + 2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    measured = run_stages(args)
    rows, peak = measured["stages"], measured["matmul_flops"]
    base = rows[0]
    table = []
    for stage, row in rows.items():
        table.append({
            "zero_stage": stage,
            "model_state_mb_per_rank": row["model_state_bytes"] / 2**20,
            "memory_ratio": row["model_state_bytes"] / base["model_state_bytes"],
            "theory_mixed_precision": THEORY_MIXED[stage],
            "theory_fp32": THEORY_FP32[stage],
            "comm_buckets_mb": row["comm_bucket_bytes"] / 2**20,
            "step_s": row["step_s"],
            "step_time_ratio": row["step_s"] / base["step_s"],
            "mfu": measured["model_flops_per_step"] / row["step_s"] / peak,
        })  # fmt: skip
    header = (f"{'stage':>5} {'state MB/rank':>13} {'ratio':>6} {'theory mixed':>12} {'theory fp32':>11} "
              f"{'buckets MB':>10} {'step s':>7} {'step ratio':>10} {'MFU':>6}")  # fmt: skip
    millions = measured["params"] / 1e6
    print(f"ZeRO stages, {WORKERS} workers x 1 thread, LM preset {args.preset!r} ({millions:.1f}M params), "
          f"seq {args.seq_len} x micro-batch {args.micro_batch}, fp32 on CPU; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s per worker")  # fmt: skip
    print(header)
    for r in table:
        print(f"{r['zero_stage']:>5} {r['model_state_mb_per_rank']:>13.1f} {r['memory_ratio']:>6.3f} "
              f"{r['theory_mixed_precision']:>12.4f} {r['theory_fp32']:>11.3f} {r['comm_buckets_mb']:>10.0f} "
              f"{r['step_s']:>7.3f} {r['step_time_ratio']:>10.2f} {r['mfu']:>6.1%}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "train_zero",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__, "deepspeed": deepspeed.__version__},
        "setup": {"workers": WORKERS, "threads_per_worker": 1, "preset": args.preset, "params": measured["params"],
                  "seq_len": args.seq_len, "micro_batch": args.micro_batch, "timed_steps": args.steps,
                  "precision": "fp32", "matmul_flops_per_worker": peak,
                  "model_flops_per_step_per_rank": measured["model_flops_per_step"]},
        "rows": table,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {RESULTS}")
    ray.shutdown()


if __name__ == "__main__":
    main()

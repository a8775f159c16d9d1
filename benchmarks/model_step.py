#!/usr/bin/env python3
"""Training-step throughput of the default model under the speed settings it offers.

Feeds one fixed random batch (no input pipeline) to WideSmallResNet and times
forward, backward and the Lookahead-SGD step for each variant, alternating
the variants over several rounds in one process:

- ghost batch norm (the model as shipped) against plain batch norm, which
  prices GhostBatchNorm2d, and against an earlier ghost batch norm that
  folded the groups into channels with two copies each way;
- bfloat16 autocast against float32 (CPU_BF16);
- torch.compile against eager mode (COMPILE), compile time reported apart.

Each variant prints images/s and its ratio to the shipped setting. Commands,
from the repository root:

    python3 benchmarks/model_step.py              # about 1 minute on 2 CPU cores, plus about 1 minute to compile on a cold cache
    python3 benchmarks/model_step.py --no-compile
    python3 benchmarks/model_step.py --device cuda

Record figures in BENCHMARKS.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ObsCure_MNIST as om  # noqa: E402


class PlainBatchNorm2d(torch.nn.BatchNorm2d):
    """nn.BatchNorm2d with GhostBatchNorm2d's signature, to price the ghost groups."""

    def __init__(self, num_features: int, ghost_batch: int = 32, **kwargs):
        super().__init__(num_features, **kwargs)


class FoldedGhostBatchNorm2d(om.GhostBatchNorm2d):
    """Ghost batch norm as first shipped: (G*S, C, H, W) is copied to (S, G*C, H, W),
    normalized by one batch_norm call and copied back. A batch that does not divide
    into equal groups goes to the shipped GhostBatchNorm2d instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] % self.ghost_batch:
            return super().forward(x)
        groups, size = x.shape[0] // self.ghost_batch, self.ghost_batch
        channels, height, width = x.shape[1:]
        folded = x.reshape(groups, size, channels, height, width).transpose(0, 1)
        folded = folded.reshape(size, groups * channels, height, width)
        mean = torch.zeros(groups * channels, device=x.device)
        var = torch.ones(groups * channels, device=x.device)
        out = F.batch_norm(folded, mean, var, self.weight.repeat(groups), self.bias.repeat(groups), True, 1.0,
                           self.eps)
        out = out.reshape(size, groups, channels, height, width).transpose(0, 1)
        out = out.reshape(groups * size, channels, height, width)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.view(groups, channels).mean(0), self.momentum)
            self.running_var.lerp_(var.view(groups, channels).mean(0), self.momentum)
        return out.contiguous(memory_format=torch.channels_last)


def build(cfg: om.Config, device: torch.device, norm: type | None) -> torch.nn.Module:
    ghost = om.GhostBatchNorm2d
    if norm is not None:
        # BasicBlock and WideSmallResNet look the class up in the module at
        # construction time, so a temporary swap changes only this model.
        om.GhostBatchNorm2d = norm
    try:
        torch.manual_seed(cfg.seed)
        return om.build_model(cfg, device)
    finally:
        om.GhostBatchNorm2d = ghost


class Variant:
    """One model setting with its optimizer and a fixed batch."""

    def __init__(self, name: str, cfg: om.Config, device: torch.device, norm: type | None, amp_dtype,
                 compile_model: bool):
        self.name, self.device, self.amp_dtype = name, device, amp_dtype
        self.model = build(cfg, device, norm)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.optimizer = om.build_optimizer(self.model, cfg)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(cfg.batch_size, 1, 28, 28, generator=generator).to(device)
        self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator).to(device)
        self.rates: list[float] = []
        self.first_step_seconds = self.timed(1)

    def step(self) -> None:
        with om.autocast_context(self.device, self.amp_dtype):
            logits = self.forward(self.x)
        loss = F.cross_entropy(logits.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def timed(self, steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time training steps of the default model per speed setting.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")

    cfg = om.default_config()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp_dtype, _ = om.precision_for(device, cpu_bf16=True)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; "
          f"width {cfg.width}, batch {cfg.batch_size}; {args.rounds} rounds of {args.steps} steps")

    variants = [
        Variant("ghost bn, autocast", cfg, device, None, amp_dtype, False),
        Variant("plain bn, autocast", cfg, device, PlainBatchNorm2d, amp_dtype, False),
        Variant("folded ghost bn, autocast", cfg, device, FoldedGhostBatchNorm2d, amp_dtype, False),
        Variant("ghost bn, float32", cfg, device, None, None, False),
    ]
    if not args.no_compile:
        variants.append(Variant("ghost bn, autocast, compiled", cfg, device, None, amp_dtype, True))
    for variant in variants:
        variant.timed(2)  # warm-up, after compilation in the first step

    for _ in range(args.rounds):
        for variant in variants:
            variant.rates.append(args.steps * cfg.batch_size / variant.timed(args.steps))
    base = statistics.median(variants[0].rates)
    for variant in variants:
        rate = statistics.median(variant.rates)
        print(f"{variant.name:<30} {rate:8,.0f} img/s  ratio to shipped {rate / base:5.2f}  "
              f"first step {variant.first_step_seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

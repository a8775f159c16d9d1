#!/usr/bin/env python3
"""Training throughput of ObsCure MNIST's on-device input path against the original's DataLoader path.

Both sides train the default WideSmallResNet (fresh model, Lookahead SGD,
cross-entropy, the same autocast and channels_last input) with batches of
BATCH_SIZE images. They differ only in where the batches come from:

- ours: the training images sit on the device as one uint8 tensor, and each
  step indexes a random batch and augments it there (shift, rotation, zoom, erasing),
  as ObsCure_MNIST.train_one_epoch does;
- reference: the original script's input path, where torchvision PIL
  transforms run per image (RandomCrop with 4 px padding, RandomRotation(8),
  ToTensor, Normalize, RandomErasing) in a DataLoader with 4 workers.

MixUp/CutMix are left out on both sides: they act on the batch after it
arrives, so they cost the same on either path.

One process runs an untimed warm-up on each side, then alternates timed
rounds (ours, reference, ours, ...), so a change in machine load hits both.
It prints every round, the median images/s per side, the process's peak
resident memory and, as the last line,

    speedup X.XX (ours A img/s, reference B img/s, device D)

Commands, from the repository root:

    python3 benchmarks/speed.py --quick          # smoke test, meant to take under 2 minutes on 2 idle CPU cores
    python3 benchmarks/speed.py --device cuda

The header shows the load average because other busy processes slow both
sides unevenly; figures from a busy machine are not worth recording.

Data: Kaggle's train.csv(.gz) from --data-dir, by default shared/data/mnist
in the folder above the repository. Without that file, the benchmark uses
random images of the same shape, which cost the same to augment and train on.

Record full-run figures in BENCHMARKS.md with the machine, the date and the
command; --quick figures are too short to quote.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import ObsCure_MNIST as om  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
KAGGLE_TRAIN_ROWS = 42_000  # rows of Kaggle's train.csv, the size of the random stand-in

REFERENCE_WORKERS = 4  # the original script's DataLoader num_workers

ROUNDS = 5
WARMUP_STEPS = 3  # per side, enough for cudnn autotuning and the workers' first batches
# Each reference round can start with up to 8 batches that its workers made
# during our round (see benchmark()), so rounds need many more steps than 8.
STEPS = {"cuda": 200, "cpu": 50}
QUICK_ROUNDS, QUICK_STEPS, QUICK_WARMUP_STEPS = 3, 3, 1


# =============================================================================
# Setup
# =============================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time training steps fed by ObsCure MNIST's on-device augmentation "
        "and by the original script's per-image PIL transforms in a DataLoader.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to train on (default: cuda if available, else cpu)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with Kaggle's train.csv or train.csv.gz "
                        f"(default: {DEFAULT_DATA_DIR}, else random images)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_ROUNDS} rounds of {QUICK_STEPS} steps per side, "
                        f"{QUICK_WARMUP_STEPS} warm-up steps")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds per side (default: {ROUNDS})")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per round per side "
                        f"(default: {STEPS['cuda']} on cuda, {STEPS['cpu']} on cpu)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps per side before the first round (default: {WARMUP_STEPS})")
    args = parser.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU; use --device cpu")
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else ROUNDS
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else STEPS[args.device]
    if args.warmup is None:
        args.warmup = QUICK_WARMUP_STEPS if args.quick else WARMUP_STEPS
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: must be 0 or more")
    return args


def find_train_csv(folder: Path) -> Path | None:
    for name in ("train.csv", "train.csv.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_images(data_dir: Path | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Return uint8 images (N, 28, 28), int64 labels and a description of their source.

    An explicit --data-dir without train.csv raises InputError. The default
    folder falls back to random images, so the benchmark also runs in a bare clone.
    """
    folder = data_dir if data_dir is not None else DEFAULT_DATA_DIR
    path = find_train_csv(folder)
    if path is not None:
        images, labels = om.read_digits_csv(om.CsvSource(str(path), path), with_label=True)
        return images, labels, f"{path} ({len(labels):,} images)"
    if data_dir is not None:
        raise om.InputError(f"--data-dir {data_dir}: no train.csv or train.csv.gz there; "
                            "pass the folder that contains Kaggle's train.csv, or omit --data-dir")

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(KAGGLE_TRAIN_ROWS, om.IMAGE_SIZE, om.IMAGE_SIZE), dtype=np.uint8)
    labels = rng.integers(0, om.NUM_CLASSES, size=KAGGLE_TRAIN_ROWS).astype(np.int64)
    return images, labels, f"{KAGGLE_TRAIN_ROWS:,} random images (no train.csv in {folder})"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"cpu {cpu_model_name()}, {torch.get_num_threads()} torch threads"


def describe_load() -> str:
    """Return the 1-minute load average against the CPU count, where the OS reports it."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return "load average unknown"
    return f"load average {load:.2f} on {os.cpu_count()} CPUs before the data was loaded"


def print_header(args: argparse.Namespace, cfg: om.Config, device: torch.device, amp_dtype,
                 data_source: str, load: str) -> None:
    import torchvision

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    precision = str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"
    print(f"ObsCure MNIST input-path benchmark, {now}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"device: {describe_device(device)}; {load}")
    print(f"data: {data_source}")
    print(f"model: WideSmallResNet width {cfg.width}, ghost batch {cfg.ghost_batch}; batch {cfg.batch_size}; "
          f"autocast {precision}, channels_last; reference: {REFERENCE_WORKERS} DataLoader workers")
    print(f"rounds per side: {args.rounds}, steps per round: {args.steps}, untimed warm-up steps per side: "
          f"{args.warmup}{' (--quick)' if args.quick else ''}", flush=True)


# =============================================================================
# Batch sources
# =============================================================================


class DeviceBatches:
    """Ours: random batches indexed from uint8 images on the device and augmented there.

    Like train_one_epoch, it walks one random permutation per pass, so the
    last batch of a pass is smaller when the batch size does not divide N.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, cfg: om.Config, device: torch.device):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.cfg, self.device = cfg, device
        self.order = torch.randperm(len(labels), device=device)
        self.cursor = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor >= len(self.order):
            self.order = torch.randperm(len(self.order), device=self.device)
            self.cursor = 0
        rows = self.order[self.cursor: self.cursor + self.cfg.batch_size]
        self.cursor += self.cfg.batch_size
        x = om.augment_batch(om.to_float(self.images[rows]), self.cfg, strong=True)
        x = om.normalize(x).contiguous(memory_format=torch.channels_last)
        return x, self.labels[rows]


class PilDigits(torch.utils.data.Dataset):
    """uint8 images (N, 28, 28) served as PIL images through a per-image transform, like torchvision's MNIST."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


# The original script's strong augmentation, fixed here because our defaults
# have moved away from it (2 px shift, 10 degrees, zoom).
ORIGINAL_PADDING = 4
ORIGINAL_DEGREES = 8.0
ORIGINAL_ERASE_PROB = 0.25
ORIGINAL_ERASE_AREA = (0.02, 0.15)


def reference_transform() -> transforms.Compose:
    """Build the original's per-image PIL augmentation."""
    return transforms.Compose([
        transforms.RandomCrop(om.IMAGE_SIZE, padding=ORIGINAL_PADDING),
        transforms.RandomRotation(ORIGINAL_DEGREES),
        transforms.ToTensor(),
        transforms.Normalize((om.MNIST_MEAN,), (om.MNIST_STD,)),
        transforms.RandomErasing(p=ORIGINAL_ERASE_PROB, scale=ORIGINAL_ERASE_AREA),
    ])


class LoaderBatches:
    """Reference: batches from a DataLoader, moved to the device as channels_last.

    One iterator lives across rounds. When it runs out, a new one is made
    inside the timed step, because the original pays the workers' restart
    at every epoch too.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, cfg: om.Config, device: torch.device):
        dataset = PilDigits(images, labels, reference_transform())
        # NOTE: the original's pin_memory setting is not known, so this keeps DataLoader's default (off).
        # The worker count is the original's on purpose, so DataLoader's
        # warning about more workers than CPUs is silenced.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=REFERENCE_WORKERS)
        self.device = device
        self.iterator = iter(self.loader)  # starts the workers, before any timing

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            x, y = next(self.iterator)
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def close(self) -> None:
        # Dropping the last reference makes the iterator stop and join its workers.
        self.iterator = None


# =============================================================================
# Timing
# =============================================================================


class Trainer:
    """A fresh model and optimizer fed by one batch source."""

    def __init__(self, name: str, batches, cfg: om.Config, device: torch.device, amp_dtype, use_scaler: bool):
        torch.manual_seed(cfg.seed)  # both sides start from the same weights
        self.name, self.batches = name, batches
        self.device, self.amp_dtype = device, amp_dtype
        self.model = om.build_model(cfg, device)
        self.model.train()
        self.optimizer = om.build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def step(self) -> int:
        """Train on one batch and return its number of images."""
        x, y = self.batches.next_batch()
        with om.autocast_context(self.device, self.amp_dtype):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return y.shape[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round(trainer: Trainer, steps: int) -> tuple[int, float]:
    """Run `steps` training steps and return (images, seconds), with the GPU's queued work included."""
    synchronize(trainer.device)
    started = time.perf_counter()
    images = sum(trainer.step() for _ in range(steps))
    synchronize(trainer.device)
    return images, time.perf_counter() - started


def benchmark(trainers: list[Trainer], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Warm up every trainer, then alternate timed rounds and return images/s per round by trainer name.

    NOTE: between its rounds the reference's workers keep filling their queue
    (DataLoader's default prefetch_factor of 2 batches per worker), so each
    reference round starts with up to 8 ready batches, and on a CPU that work
    competes with our rounds. Both effects favor the reference and shrink as
    --steps grows; with --quick's 3 steps they dominate.
    """
    # Warming up in reverse order lets the reference's workers refill their
    # queue during our untimed warm-up rather than during our first round.
    for trainer in reversed(trainers):
        for _ in range(warmup):
            trainer.step()
        synchronize(trainer.device)

    rates = {trainer.name: [] for trainer in trainers}
    for round_number in range(1, rounds + 1):
        for trainer in trainers:
            images, seconds = timed_round(trainer, steps)
            rate = images / seconds
            rates[trainer.name].append(rate)
            print(f"round {round_number:>2}  {trainer.name:<9}  {images:>7,} images in {seconds:7.2f} s  "
                  f"{rate:9,.0f} img/s", flush=True)
    return rates


def peak_rss_mib(scope: int) -> float:
    """Return getrusage's ru_maxrss for RUSAGE_SELF or RUSAGE_CHILDREN in MiB (it is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(scope).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# =============================================================================
# Main
# =============================================================================


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = om.default_config()
    device = torch.device(args.device)
    # NOTE: the CUDA branches here (cudnn, synchronize, GradScaler for float16) have not been run on a GPU yet.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as ObsCure_MNIST.run sets it
    amp_dtype, use_scaler = om.precision_for(device, cfg.cpu_bf16)

    load = describe_load()
    started = time.perf_counter()
    try:
        images, labels, data_source = load_images(args.data_dir, cfg.seed)
    except om.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    data_source += f", loaded in {time.perf_counter() - started:.1f} s"
    print_header(args, cfg, device, amp_dtype, data_source, load)

    reference_batches = LoaderBatches(images, labels, cfg, device)
    trainers = [
        Trainer("ours", DeviceBatches(images, labels, cfg, device), cfg, device, amp_dtype, use_scaler),
        Trainer("reference", reference_batches, cfg, device, amp_dtype, use_scaler),
    ]
    rates = benchmark(trainers, args.rounds, args.steps, args.warmup)
    reference_batches.close()

    ours, reference = statistics.median(rates["ours"]), statistics.median(rates["reference"])
    print(f"median over {args.rounds} rounds: ours {ours:,.0f} img/s, reference {reference:,.0f} img/s")
    print(f"peak resident memory of the whole process, both sides: {peak_rss_mib(resource.RUSAGE_SELF):,.0f} MiB "
          f"(DataLoader workers not included; the largest peaked at {peak_rss_mib(resource.RUSAGE_CHILDREN):,.0f} MiB, "
          "counting pages it shares with this process)")
    print(f"speedup {ours / reference:.2f} (ours {ours:.0f} img/s, reference {reference:.0f} img/s, "
          f"device {describe_device(device)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers: small synthetic digit data in Kaggle's CSV layout and CLI runners."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ObsCure_MNIST as om  # noqa: E402

SCRIPT = ROOT / "ObsCure_MNIST.py"
# Real MNIST in Kaggle's layout, kept outside the repository; tests that need it skip without it.
SHARED_MNIST = Path(os.environ.get("OBSCURE_MNIST_DATA", ROOT.parent / "shared" / "data" / "mnist"))


def synthetic_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Make easy 28x28 uint8 images: digit k is a bright rectangle of its own shape, plus noise."""
    shapes = [(4, 20), (20, 4), (12, 12), (6, 6), (16, 8), (8, 16), (20, 20), (2, 24), (24, 2), (14, 3)]
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        height, width = shapes[label]
        top = (28 - height) // 2 + int(rng.integers(-2, 3))
        left = (28 - width) // 2 + int(rng.integers(-2, 3))
        images[index, max(top, 0): top + height, max(left, 0): left + width] = 230
    return images, labels.astype(np.int64)


def digits_frame(images: np.ndarray, labels: np.ndarray | None) -> pd.DataFrame:
    frame = pd.DataFrame(images.reshape(len(images), -1), columns=om.PIXEL_COLUMNS)
    if labels is not None:
        frame.insert(0, "label", labels)
    return frame


def write_kaggle_csvs(folder: Path, train_rows: int = 600, test_rows: int = 200, gz: bool = False) -> Path:
    """Write train.csv and test.csv (or .csv.gz) of synthetic digits into folder; return folder."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_digits(train_rows, seed=1)
    test_x, _ = synthetic_digits(test_rows, seed=2)
    suffix = ".csv.gz" if gz else ".csv"
    digits_frame(train_x, train_y).to_csv(folder / f"train{suffix}", index=False)
    digits_frame(test_x, None).to_csv(folder / f"test{suffix}", index=False)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_kaggle_csvs(tmp_path_factory.mktemp("tiny_data"))


TINY_ARGS = ["--epochs", "3", "--width", "8", "--batch-size", "32", "--ghost-batch", "16", "--base-lr", "0.1",
             "--eval-batch", "256", "--threads", "1", "--tta-runs", "2", "--device", "cpu", "--top-k", "2"]


def tiny_config(data_dir: Path, out: Path, **overrides) -> "om.Config":
    values = dict(data_dir=str(data_dir), results_dir=str(out / "results"),
                  submission_path=str(out / "submission.csv"), epochs=3, width=8, batch_size=32, base_lr=0.1,
                  ghost_batch=16, eval_batch=256, threads=1, tta_runs=2, device="cpu", top_k=2)
    values.update(overrides)
    return om.default_config(**values)


def cli_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--results-dir", str(out / "results"),
            "--submission", str(out / "submission.csv"), *TINY_ARGS, *extra]


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)

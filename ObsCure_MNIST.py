#!/usr/bin/env python3
"""ObsCure MNIST: a compact wide ResNet for Kaggle's Digit Recognizer.

Trains WideSmallResNet (ghost batch norm, MixUp/CutMix, Lookahead around SGD,
mixed precision, SWA) on Kaggle's train.csv, chooses checkpoints on a held-out
validation split, and writes submission.csv from an ensemble of the best
checkpoints and the SWA model, each with test-time augmentation.

    python3 ObsCure_MNIST.py --data-dir path/to/digit-recognizer
    python3 ObsCure_MNIST.py --help

Every UPPER_CASE constant below is also a command-line flag (EPOCHS is
--epochs). README.md lists measured results with their commands and machines.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

# =============================================================================
# Config
# =============================================================================
# Edit these, or override any of them on the command line: WIDTH is --width.

# Data
DATA_DIR = "data"  # folder (or Kaggle .zip) with train.csv and test.csv, plain or .gz
TRAIN_LIMIT = 0  # rows of train.csv to use, 0 = all
VAL_FRACTION = 0.1  # fraction of training rows held out for validation, 0 = none

# Model
WIDTH = 16  # channels of the first stage; stages have WIDTH, 2*WIDTH, 4*WIDTH
GHOST_BATCH = 32  # images per ghost batch-norm group
NUM_CLASSES = 10

# Optimization
SEED = 42
EPOCHS = 24
BATCH_SIZE = 256  # images per optimizer step
BASE_LR = 0.2  # peak learning rate of the cosine schedule
WARMUP_FRAC = 0.15  # share of the cosine phase spent rising to BASE_LR
ETA_MIN = 1e-6  # learning rate at the end of the cosine schedule
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LOOKAHEAD_K = 5  # fast steps between Lookahead's slow-weight updates
LOOKAHEAD_ALPHA = 0.5  # fraction of the way the slow weights move towards the fast ones

# Augmentation and mixing
SHIFT_PIXELS = 2  # max translation of the strong augmentation, pixels
ROTATE_DEGREES = 10.0  # max rotation of the strong augmentation, degrees
SCALE_FRAC = 0.1  # max zoom in or out of the strong augmentation, fraction of the size
ERASE_PROB = 0.25  # probability of random erasing per image (strong only)
ERASE_MIN_AREA = 0.02  # smallest erased box, fraction of the image
ERASE_MAX_AREA = 0.15  # largest erased box, fraction of the image
LIGHT_SHIFT_PIXELS = 1  # max translation of the light augmentation, pixels
LIGHT_ROTATE_DEGREES = 5.0  # max rotation of the light augmentation, degrees
LIGHT_SCALE_FRAC = 0.05  # max zoom in or out of the light augmentation, fraction of the size
FINAL_FRAC = 0.25  # fraction of epochs at the end with light augmentation, no mixing
MIXPROB = 0.102  # probability that a batch is mixed (MixUp or CutMix)
USE_CUTMIX_PROB = 0.8  # share of mixed batches that use CutMix rather than MixUp
MIXUP_ALPHA = 0.091  # MixUp's lambda ~ Beta(alpha, alpha)
CUTMIX_BETA = 0.35  # CutMix's lambda ~ Beta(beta, beta) before box clipping

# Stochastic weight averaging
SWA_START = 0.75  # fraction of epochs trained with the cosine schedule before SWA
SWA_LR = 0.01  # constant learning rate during SWA
GHOST_BN_UPDATE_BATCH = 512  # images per batch when SWA's batch-norm statistics are recomputed

# Evaluation and ensembling
TTA_RUNS = 5  # fixed test-time shifts averaged per image (1 = no shift)
TOP_K = 3  # best epoch checkpoints (by validation accuracy) kept for the ensemble
EVAL_BATCH = 1024  # images per batch at evaluation

# Speed
DEVICE = "auto"  # "auto", "cpu" or "cuda"
CPU_BF16 = True  # bfloat16 autocast on CPU; False trains in float32
COMPILE = False  # torch.compile the model (slow first epoch)
THREADS = 0  # CPU threads for torch, 0 = torch's default

# Outputs
RESULTS_DIR = "results"
SAVE_PREFIX = "mnist_seed{seed}"  # file-name prefix; {seed} becomes SEED
SUBMISSION_PATH = "submission.csv"
RESUME = False  # continue from {SAVE_PREFIX}_last.pth in RESULTS_DIR
OVERWRITE = False  # replace outputs of an earlier run with the same prefix

CONFIG_HELP = {
    "DATA_DIR": "folder with train.csv and test.csv (plain or .gz), or Kaggle's digit-recognizer.zip; "
    "without them torchvision's MNIST is downloaded there",
    "TRAIN_LIMIT": "number of training rows used, 0 = all",
    "VAL_FRACTION": "share of training rows held out for validation, 0 = train on all (fraction)",
    "WIDTH": "channels of the first stage, later stages 2x and 4x (channels)",
    "GHOST_BATCH": "images per ghost batch-norm group (images)",
    "NUM_CLASSES": "number of output classes",
    "SEED": "seed of the split, the initial weights and the augmentation",
    "EPOCHS": "passes over the training set (epochs)",
    "BATCH_SIZE": "images per optimizer step (images)",
    "BASE_LR": "peak learning rate of the cosine schedule",
    "WARMUP_FRAC": "warm-up to BASE_LR at the start of the cosine phase (fraction of its steps)",
    "ETA_MIN": "learning rate at the end of the cosine schedule",
    "MOMENTUM": "SGD momentum",
    "WEIGHT_DECAY": "SGD weight decay (L2 factor)",
    "LOOKAHEAD_K": "fast optimizer steps between slow-weight updates (steps)",
    "LOOKAHEAD_ALPHA": "slow-weight step towards the fast weights (fraction)",
    "SHIFT_PIXELS": "max shift of the strong augmentation (pixels)",
    "ROTATE_DEGREES": "max rotation of the strong augmentation (degrees)",
    "SCALE_FRAC": "max zoom in or out of the strong augmentation, 0.1 = 90-110 %% (fraction)",
    "ERASE_PROB": "random-erasing probability per image (probability)",
    "ERASE_MIN_AREA": "smallest erased box (fraction of the image)",
    "ERASE_MAX_AREA": "largest erased box (fraction of the image)",
    "LIGHT_SHIFT_PIXELS": "max shift of the light augmentation (pixels)",
    "LIGHT_ROTATE_DEGREES": "max rotation of the light augmentation (degrees)",
    "LIGHT_SCALE_FRAC": "max zoom in or out of the light augmentation (fraction)",
    "FINAL_FRAC": "last epochs with light augmentation and no mixing (fraction of epochs)",
    "MIXPROB": "chance that a batch is mixed (probability)",
    "USE_CUTMIX_PROB": "share of mixed batches that use CutMix (probability)",
    "MIXUP_ALPHA": "MixUp Beta(alpha, alpha) parameter",
    "CUTMIX_BETA": "CutMix Beta(beta, beta) parameter",
    "SWA_START": "epochs of cosine schedule before SWA begins (fraction of epochs)",
    "SWA_LR": "constant learning rate during SWA",
    "GHOST_BN_UPDATE_BATCH": "batch size when SWA's batch-norm statistics are recomputed (images)",
    "TTA_RUNS": "fixed test-time shifts averaged per image, 1 = none (views)",
    "TOP_K": "best epoch checkpoints kept for the ensemble (checkpoints)",
    "EVAL_BATCH": "images per evaluation batch (images)",
    "DEVICE": "auto, cpu or cuda",
    "CPU_BF16": "bfloat16 autocast on CPU (on/off)",
    "COMPILE": "torch.compile the model (on/off)",
    "THREADS": "CPU threads for torch, 0 = torch's default (threads)",
    "RESULTS_DIR": "folder for checkpoints, history, plots and summary",
    "SAVE_PREFIX": "file-name prefix of the outputs; {seed} becomes the seed",
    "SUBMISSION_PATH": "where submission.csv is written",
    "RESUME": "continue the run saved in <prefix>_last.pth",
    "OVERWRITE": "replace outputs of an earlier run with the same prefix",
}

# Keys that change the network's shape: a checkpoint saved with other values
# cannot be loaded into this model.
MODEL_KEYS = ("width", "ghost_batch", "num_classes")

# Keys that set only where and how fast the run goes; a resumed run may change them.
RUNTIME_KEYS = (
    "data_dir", "results_dir", "submission_path", "device", "compile", "threads",
    "resume", "overwrite", "eval_batch",
)

# Settings added after runs had already been saved, each with the value that
# reproduces how those runs trained. A resumed old run gets these values,
# not the current defaults.
ADDED_KEYS_OLD_VALUES = {"warmup_frac": 0.0, "scale_frac": 0.0, "light_scale_frac": 0.0}

Config = dataclasses.make_dataclass(
    "Config",
    [(name.lower(), type(globals()[name])) for name in CONFIG_HELP],
    frozen=True,
)
Config.__doc__ = "Frozen run settings: the UPPER_CASE constants in lower case."


class InputError(Exception):
    """Bad user input: a file, value or flag. main() prints it and exits with 2."""


def default_config(**overrides) -> Config:
    """Build a Config from the module constants, as they are now, plus overrides."""
    values = {name.lower(): globals()[name] for name in CONFIG_HELP}
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise TypeError(f"unknown config keys: {', '.join(unknown)}")
    values.update(overrides)
    cfg = Config(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Raise InputError naming the first setting outside its valid range."""
    def fail(name: str, rule: str) -> None:
        flag = "--" + name.replace("_", "-")
        raise InputError(f"invalid {flag} {getattr(cfg, name)!r}: {rule}")

    positive = ("width", "ghost_batch", "epochs", "batch_size", "lookahead_k",
                "ghost_bn_update_batch", "tta_runs", "top_k", "eval_batch")
    for name in positive:
        if getattr(cfg, name) < 1:
            fail(name, "must be at least 1")
    if cfg.num_classes < 2:
        fail("num_classes", "must be at least 2")
    if cfg.train_limit < 0:
        fail("train_limit", "must be 0 (all rows) or a positive row count")
    if cfg.threads < 0:
        fail("threads", "must be 0 (torch's default) or a positive thread count")
    if cfg.shift_pixels < 0 or cfg.light_shift_pixels < 0:
        fail("shift_pixels" if cfg.shift_pixels < 0 else "light_shift_pixels", "must be 0 or more")
    if cfg.tta_runs > len(TTA_SHIFTS):
        fail("tta_runs", f"at most {len(TTA_SHIFTS)} fixed shifts are defined")
    for name in ("val_fraction", "warmup_frac"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            fail(name, "must be in [0, 1)")
    for name in ("scale_frac", "light_scale_frac"):
        if not 0.0 <= getattr(cfg, name) <= 0.5:
            fail(name, "must be in [0, 0.5]")
    for name in ("final_frac", "mixprob", "use_cutmix_prob", "erase_prob", "lookahead_alpha",
                 "erase_min_area", "erase_max_area", "swa_start", "momentum"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            fail(name, "must be in [0, 1]")
    if cfg.erase_min_area > cfg.erase_max_area:
        fail("erase_min_area", f"must not exceed --erase-max-area {cfg.erase_max_area}")
    for name in ("base_lr", "swa_lr", "mixup_alpha", "cutmix_beta"):
        if not getattr(cfg, name) > 0:
            fail(name, "must be positive")
    if cfg.eta_min < 0 or cfg.weight_decay < 0:
        fail("eta_min" if cfg.eta_min < 0 else "weight_decay", "must be 0 or more")
    if cfg.eta_min > cfg.base_lr:
        fail("eta_min", f"must not exceed --base-lr {cfg.base_lr}, the peak of the schedule")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        fail("device", "choose auto, cpu, cuda or cuda:N")
    # Prefixes also become glob-free file-name patterns, so only plain
    # characters are allowed, and no leading dot (temp files use one).
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", cfg.save_prefix.replace("{seed}", "0")):
        fail("save_prefix", "use up to 100 letters, digits, '_', '-' or '.', not starting with '.', "
                            "plus the placeholder {seed}")
    if not 0 <= cfg.seed < 2**32:
        fail("seed", "must be in [0, 2**32)")
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(field.name, "must be a finite number")


def save_prefix(cfg: Config) -> str:
    """Return the output file-name prefix with {seed} filled in."""
    return cfg.save_prefix.replace("{seed}", str(cfg.seed))


def config_dict(cfg: Config) -> dict:
    """Return the config as a plain dict, the form stored in checkpoints and JSON."""
    return dataclasses.asdict(cfg)


# =============================================================================
# Data
# =============================================================================

IMAGE_SIZE = 28
PIXELS = IMAGE_SIZE * IMAGE_SIZE
PIXEL_COLUMNS = [f"pixel{i}" for i in range(PIXELS)]
KAGGLE_INPUT_DIR = Path("/kaggle/input/digit-recognizer")
CSV_CHUNK_ROWS = 10_000  # rows parsed per pandas chunk, which bounds the int32 buffer


@dataclasses.dataclass
class CsvSource:
    """One CSV file on disk (plain or .gz) or inside a zip archive."""

    name: str  # shown in messages
    path: Path
    member: str | None = None  # file inside the zip archive at path

    def open_binary(self):
        if self.member is not None:
            archive = zipfile.ZipFile(self.path)
            raw = archive.open(self.member)
            name = self.member
        else:
            raw = open(self.path, "rb")
            name = self.path.name
        if name.endswith(".gz"):
            return gzip.GzipFile(fileobj=raw, mode="rb")
        return raw


@dataclasses.dataclass
class DataSource:
    """Image source: Kaggle CSVs or torchvision's MNIST."""

    kind: str  # "csv" or "mnist"
    train: CsvSource | None = None
    test: CsvSource | None = None
    sample_submission: CsvSource | None = None
    mnist_root: Path | None = None

    def describe(self) -> str:
        if self.kind == "csv":
            return f"{self.train.name} and {self.test.name}"
        return f"torchvision MNIST in {self.mnist_root}"


@dataclasses.dataclass
class Dataset:
    """Images as uint8 arrays of shape (N, 28, 28) and labels as int64 arrays."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray | None  # only torchvision's MNIST has test labels
    source: str
    sample_submission_ids: np.ndarray | None = None


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _csv_sources_in_zip(path: Path) -> DataSource:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(f"{path}: not a readable zip archive ({error}); download it again") from error
    found = {}
    for stem in ("train.csv", "test.csv", "sample_submission.csv"):
        matches = [n for n in names if Path(n).name in (stem, stem + ".gz") and not n.startswith("__MACOSX/")]
        if matches:
            found[stem] = CsvSource(name=f"{path}:{matches[0]}", path=path, member=matches[0])
    missing = [stem for stem in ("train.csv", "test.csv") if stem not in found]
    if missing:
        raise InputError(f"{path}: the archive has no {' or '.join(missing)}; it contains {', '.join(names[:5]) or 'nothing'}")
    return DataSource("csv", found["train.csv"], found["test.csv"], found.get("sample_submission.csv"))


def locate_data(data_dir: str | os.PathLike) -> DataSource:
    """Find Kaggle's CSVs in data_dir (a folder or a .zip), else in a Kaggle notebook's input.

    Without CSVs, fall back to torchvision's MNIST in data_dir.
    """
    path = Path(data_dir)
    if path.is_file():
        if zipfile.is_zipfile(path):
            return _csv_sources_in_zip(path)
        raise InputError(f"--data-dir {path} is a file but not a zip archive; pass the folder that contains train.csv and test.csv")
    candidates = [path]
    if KAGGLE_INPUT_DIR.is_dir() and KAGGLE_INPUT_DIR.resolve() != path.resolve():
        candidates.append(KAGGLE_INPUT_DIR)
    for folder in candidates:
        train, test = _find_file(folder, "train.csv"), _find_file(folder, "test.csv")
        if train and test:
            sample = _find_file(folder, "sample_submission.csv")
            return DataSource(
                "csv",
                CsvSource(str(train), train),
                CsvSource(str(test), test),
                CsvSource(str(sample), sample) if sample else None,
            )
        if train or test:
            missing = "test.csv" if train else "train.csv"
            raise InputError(f"{folder}: found {(train or test).name} but no {missing} (plain or .gz); put both files there")
        archive = folder / "digit-recognizer.zip"
        if archive.is_file():
            return _csv_sources_in_zip(archive)
    return DataSource("mnist", mnist_root=path)


def _read_header(source: CsvSource) -> list[str]:
    # The csv module, unlike pandas, keeps duplicate names as they are.
    try:
        with source.open_binary() as stream:
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
            header = next((row for row in csv.reader(text) if row), None)
    except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as error:
        raise InputError(f"{source.name}: cannot read the file, it is truncated or corrupt ({error}); download it again") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{source.name}: the header is not UTF-8 text ({error}); save the file as UTF-8 CSV") from error
    except csv.Error as error:
        raise InputError(f"{source.name}: the header line is not valid CSV ({error})") from error
    if header is None:
        raise InputError(f"{source.name}: the file is empty; download it again")
    return [c.strip() for c in header]


def _check_header(source: CsvSource, columns: list[str], with_label: bool) -> bool:
    """Raise InputError unless the columns are Kaggle's; return whether a label column is present."""
    if columns and (columns[0].startswith("Unnamed: ") or columns[0] in ("", "index")):
        raise InputError(
            f"{source.name}: the first column {columns[0]!r} looks like a pandas index; "
            "save the file with DataFrame.to_csv(index=False) or delete that column"
        )
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise InputError(f"{source.name}: duplicate column name(s) {', '.join(duplicates[:5])} in the header")
    has_label = "label" in columns
    if with_label and not has_label:
        raise InputError(f"{source.name}: no 'label' column; a training file needs label,pixel0,...,pixel783")
    expected = set(PIXEL_COLUMNS) | ({"label"} if has_label else set())
    unknown = [c for c in columns if c not in expected]
    if unknown:
        raise InputError(f"{source.name}: unknown column(s) {', '.join(map(repr, unknown[:5]))}; expected label (training only) and pixel0 to pixel783")
    missing = [c for c in PIXEL_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"{source.name}: missing column(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; expected pixel0 to pixel783")
    return has_label


def _diagnose_rows(source: CsvSource, columns: list[str], with_label: bool) -> None:
    """Scan the file row by row and raise InputError at the first malformed cell."""
    label_index = columns.index("label") if "label" in columns else -1
    try:
        with source.open_binary() as stream:
            reader = csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""))
            next(reader)
            for row in reader:
                if not row:
                    continue
                where = f"{source.name}, line {reader.line_num}"
                if len(row) != len(columns):
                    raise InputError(f"{where}: {len(row)} values, the header has {len(columns)}; fix or delete this row")
                for index, cell in enumerate(row):
                    if index == label_index and not with_label:
                        continue  # test.csv labels are ignored, whatever they hold
                    column = columns[index]
                    text = cell.strip()
                    if text == "":
                        raise InputError(f"{where}, column {column}: missing value; fill it in or delete the row")
                    try:
                        value = float(text)
                    except ValueError:
                        raise InputError(f"{where}, column {column}: {cell!r} is not a number") from None
                    if not math.isfinite(value) or value != int(value):
                        raise InputError(f"{where}, column {column}: {cell!r} is not a whole number")
                    low, high = (0, 9) if index == label_index else (0, 255)
                    if not low <= value <= high:
                        kind = "label" if index == label_index else "pixel"
                        raise InputError(f"{where}, column {column}: {kind} {cell!r} is outside {low}-{high}")
    except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as error:
        raise InputError(f"{source.name}: cannot read the file, it is truncated or corrupt ({error}); download it again") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{source.name}: not UTF-8 text ({error})") from error


def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    row, col = np.argwhere(mask)[0]
    return int(row), int(col)


def read_digits_csv(source: CsvSource, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a Kaggle digits CSV into uint8 images (N, 28, 28) and int64 labels.

    with_label=True requires a label column (train.csv). For test.csv a label
    column is ignored with a warning. Bad files raise InputError naming the
    file, line and column.
    """
    columns = _read_header(source)
    has_label = _check_header(source, columns, with_label)
    if has_label and not with_label:
        print(f"warning: {source.name} has a 'label' column; it is ignored for prediction", file=sys.stderr)

    images, labels, rows_before = [], [], 0
    # A label column of test.csv is read as text and dropped, so it may hold anything.
    dtypes = {column: (np.int32 if with_label or column != "label" else object) for column in columns}
    try:
        # pandas warns (RuntimeWarning) when it casts huge floats such as 1e20
        # to int32; the range check below reports those values instead.
        with source.open_binary() as stream, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # names= gives pandas the stripped header, so " pixel5" after a space is pixel5.
            for chunk in pd.read_csv(stream, dtype=dtypes, chunksize=CSV_CHUNK_ROWS, engine="c",
                                     encoding="utf-8-sig", header=0, names=columns):
                pixels = chunk[PIXEL_COLUMNS].to_numpy()
                bad = (pixels < 0) | (pixels > 255)
                if bad.any():
                    row, col = _first_bad(bad)
                    raise InputError(f"{source.name}, data row {rows_before + row + 1}, column pixel{col}: "
                                     f"pixel {pixels[row, col]} is outside 0-255")
                images.append(pixels.astype(np.uint8))
                if with_label:
                    chunk_labels = chunk["label"].to_numpy()
                    bad_rows = np.flatnonzero((chunk_labels < 0) | (chunk_labels > 9))
                    if bad_rows.size:
                        row = int(bad_rows[0])
                        raise InputError(f"{source.name}, data row {rows_before + row + 1}, column label: "
                                         f"label {chunk_labels[row]} is outside 0-9")
                    labels.append(chunk_labels.astype(np.int64))
                rows_before += len(chunk)
    except (ValueError, OverflowError, pd.errors.ParserError) as error:
        if isinstance(error, InputError):
            raise
        _diagnose_rows(source, columns, with_label)
        raise InputError(f"{source.name}: cannot parse the file ({error})") from error
    except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as error:
        raise InputError(f"{source.name}: cannot read the file, it is truncated or corrupt ({error}); download it again") from error

    if rows_before == 0:
        raise InputError(f"{source.name}: the header is there but no data rows follow")
    x = np.concatenate(images).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    y = np.concatenate(labels) if with_label else None
    return x, y


def _read_sample_ids(source: CsvSource) -> np.ndarray:
    columns = _read_header(source)
    if columns[:2] != ["ImageId", "Label"]:
        raise InputError(f"{source.name}: expected the columns ImageId,Label, found {','.join(columns[:4])}")
    with source.open_binary() as stream:
        return pd.read_csv(stream, usecols=["ImageId"])["ImageId"].to_numpy()


def load_torchvision_mnist(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load (and if needed download) MNIST with torchvision: train and test images and labels."""
    try:
        from torchvision import datasets
    except ImportError as error:
        raise InputError(
            f"no train.csv/test.csv in {root}, and torchvision, needed to download MNIST, is not installed; "
            "run pip install torchvision, or pass --data-dir with Kaggle's CSVs"
        ) from error
    try:
        train = datasets.MNIST(str(root), train=True, download=True)
        test = datasets.MNIST(str(root), train=False, download=True)
    except (RuntimeError, OSError, ValueError) as error:
        raise InputError(
            f"no train.csv/test.csv in {root}, and downloading MNIST there failed ({' '.join(str(error).split())}); "
            "check the network connection, or put Kaggle's train.csv and test.csv in that folder"
        ) from error
    return (train.data.numpy(), train.targets.numpy().astype(np.int64),
            test.data.numpy(), test.targets.numpy().astype(np.int64))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train, validation) row indices with `fraction` of every class held out."""
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    rng = np.random.default_rng(seed)
    val_parts = []
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        count = int(round(len(rows) * fraction))
        val_parts.append(rng.permutation(rows)[:count])
    val = np.sort(np.concatenate(val_parts))
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def load_data(cfg: Config) -> Dataset:
    """Load train and test images, apply TRAIN_LIMIT and split off the validation set."""
    source = locate_data(cfg.data_dir)
    sample_ids = None
    if source.kind == "csv":
        train_x, train_y = read_digits_csv(source.train, with_label=True)
        test_x, _ = read_digits_csv(source.test, with_label=False)
        test_y = None
        if source.sample_submission is not None:
            sample_ids = _read_sample_ids(source.sample_submission)
            if not np.array_equal(sample_ids, np.arange(1, len(test_x) + 1)):
                raise InputError(f"{source.sample_submission.name}: its {len(sample_ids)} ImageIds are not 1 to "
                                 f"{len(test_x)}, one per row of {source.test.name}; check that both files are complete")
    else:
        train_x, train_y, test_x, test_y = load_torchvision_mnist(source.mnist_root)

    if cfg.train_limit:
        train_x, train_y = train_x[: cfg.train_limit], train_y[: cfg.train_limit]
    if train_y.max() >= cfg.num_classes:
        raise InputError(f"{source.describe()}: labels go up to {train_y.max()}, but --num-classes is {cfg.num_classes}; "
                         "use --num-classes 10 for digits")
    missing = sorted(set(range(cfg.num_classes)) - set(np.unique(train_y).tolist()))
    if missing:
        raise InputError(
            f"{source.describe()}: the training data has no images of digit(s) {', '.join(map(str, missing))}; "
            "every class needs examples (a small --train-limit can cause this)"
        )
    train_rows, val_rows = stratified_split(train_y, cfg.val_fraction, cfg.seed)
    if len(train_rows) < cfg.num_classes:
        raise InputError(f"--val-fraction {cfg.val_fraction} leaves {len(train_rows)} of {len(train_y)} rows for "
                         "training; lower it or use more rows")
    return Dataset(
        train_x=train_x[train_rows], train_y=train_y[train_rows],
        val_x=train_x[val_rows], val_y=train_y[val_rows],
        test_x=test_x, test_y=test_y, source=source.describe(),
        sample_submission_ids=sample_ids,
    )


def data_fingerprint(data: Dataset) -> str:
    """Return a short hash of the split images and labels, stored so --resume can detect changed data."""
    digest = hashlib.blake2b(digest_size=8)
    for array in (data.train_x, data.train_y, data.val_x, data.val_y, data.test_x):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def count_duplicates(reference: np.ndarray, queries: np.ndarray) -> int:
    """Count images in `queries` that equal, pixel for pixel, some image in `reference`."""
    def digests(images: np.ndarray) -> list[bytes]:
        flat = np.ascontiguousarray(images.reshape(len(images), -1))
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]

    known = set(digests(reference))
    return sum(digest in known for digest in digests(queries))


# =============================================================================
# Augmentation
# =============================================================================
# Every function here works on whole batches on the training device: float
# images in [0, 1], shape (N, 1, 28, 28), with random parameters per image.

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """Turn uint8 images (N, 28, 28) or (N, 1, 28, 28) into float (N, 1, 28, 28) in [0, 1]."""
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    return images_uint8.float().div_(255.0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - MNIST_MEAN) / MNIST_STD


def random_affine(images: torch.Tensor, max_shift: int, max_degrees: float, max_scale: float = 0.0) -> torch.Tensor:
    """Rotate by up to max_degrees, zoom by a factor in [1 - max_scale, 1 + max_scale]
    and shift by whole pixels up to max_shift. Pixels from outside the image are 0."""
    n, _, height, width = images.shape
    device = images.device
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(max_degrees)
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), device=device).float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    if max_scale > 0:  # no draw at 0, so runs without zoom keep their random stream
        zoom = 1.0 + (torch.rand(n, device=device) * 2 - 1) * max_scale
        cos, sin = cos / zoom, sin / zoom
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    # affine_grid maps output to input coordinates in [-1, 1], so a shift of
    # +s pixels in the output is -2s/size in the input, and a zoom by z
    # divides the input coordinates by z.
    theta[:, 0, 2] = -2.0 * shift[:, 0] / width
    theta[:, 1, 2] = -2.0 * shift[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erase(images: torch.Tensor, prob: float, min_area: float, max_area: float) -> torch.Tensor:
    """Set one random box per chosen image to 0 (background), like torchvision's RandomErasing.

    Box area is uniform in [min_area, max_area] of the image and its aspect
    ratio log-uniform in [0.3, 3.3], clipped to the image.
    """
    n, _, height, width = images.shape
    device = images.device
    chosen = torch.rand(n, device=device) < prob
    area = (min_area + (max_area - min_area) * torch.rand(n, device=device)) * height * width
    log_ratio = torch.empty(n, device=device).uniform_(math.log(0.3), math.log(3.3))
    ratio = torch.exp(log_ratio)
    box_h = torch.sqrt(area * ratio).round().clamp(1, height)
    box_w = torch.sqrt(area / ratio).round().clamp(1, width)
    top = (torch.rand(n, device=device) * (height - box_h + 1)).floor()
    left = (torch.rand(n, device=device) * (width - box_w + 1)).floor()
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)))
    mask = inside & chosen.view(-1, 1, 1)
    return images.masked_fill(mask.unsqueeze(1), 0.0)


def augment_batch(images: torch.Tensor, cfg: Config, strong: bool) -> torch.Tensor:
    """Apply the strong (shift, rotation, zoom, erasing) or light (small shift, rotation, zoom) augmentation."""
    if strong:
        images = random_affine(images, cfg.shift_pixels, cfg.rotate_degrees, cfg.scale_frac)
        if cfg.erase_prob > 0:
            images = random_erase(images, cfg.erase_prob, cfg.erase_min_area, cfg.erase_max_area)
        return images
    return random_affine(images, cfg.light_shift_pixels, cfg.light_rotate_degrees, cfg.light_scale_frac)


# =============================================================================
# Model
# =============================================================================


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics come from ghost batches of `ghost_batch` images.

    In training mode the batch is cut into consecutive groups of ghost_batch
    images (the last group is smaller when the batch does not divide evenly)
    and each group is normalized with its own mean and variance. The running
    statistics move towards the average of the group statistics, weighted by
    group size. Eval mode, the parameters and the state dict are those of
    nn.BatchNorm2d, so torch's update_bn and AveragedModel work unchanged.
    """

    def __init__(self, num_features: int, ghost_batch: int = 32, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.ghost_batch = ghost_batch

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ghost_batch={self.ghost_batch}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch:
            return super().forward(x)

        # Each group is a contiguous slice of the batch, also in channels_last,
        # so the per-group batch_norm calls need no copy and cat makes the only
        # one. This step ran 1.20 times as fast as one that folded the groups
        # into channels (benchmarks/model_step.py, 2 CPU cores).
        # With momentum=1, each call writes its group's mean and unbiased
        # variance into its row of `means` and `variances`.
        groups = x.split(self.ghost_batch)
        means = torch.zeros(len(groups), self.num_features, device=x.device, dtype=torch.float32)
        variances = torch.ones(len(groups), self.num_features, device=x.device, dtype=torch.float32)
        out = torch.cat([F.batch_norm(group, means[index], variances[index], self.weight, self.bias, True, 1.0,
                                      self.eps) for index, group in enumerate(groups)])

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative average, which update_bn requests
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                # Every group but the last has ghost_batch images. Filling on the
                # device avoids a host-to-device copy in every layer and step.
                weights = torch.full((len(groups), 1), self.ghost_batch / x.shape[0], device=x.device)
                weights[-1] = groups[-1].shape[0] / x.shape[0]
                self.running_mean.lerp_((means * weights).sum(0).to(self.running_mean.dtype), factor)
                self.running_var.lerp_((variances * weights).sum(0).to(self.running_var.dtype), factor)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with ghost batch norm and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, ghost_batch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = GhostBatchNorm2d(out_channels, ghost_batch)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = GhostBatchNorm2d(out_channels, ghost_batch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                GhostBatchNorm2d(out_channels, ghost_batch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class WideSmallResNet(nn.Module):
    """ResNet for 28x28 digits: 3x3 stem, three stages of BasicBlocks at strides 1, 2, 2."""

    def __init__(self, width: int = 32, blocks: tuple[int, ...] = (3, 3, 3), num_classes: int = 10, ghost_batch: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False),
            GhostBatchNorm2d(width, ghost_batch),
            nn.ReLU(inplace=True),
        )
        stages, channels = [], width
        for index, count in enumerate(blocks):
            out_channels = width * 2**index
            stride = 1 if index == 0 else 2
            for block in range(count):
                stages.append(BasicBlock(channels, out_channels, stride if block == 0 else 1, ghost_batch))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(cfg: Config, device: torch.device) -> WideSmallResNet:
    model = WideSmallResNet(cfg.width, (3, 3, 3), cfg.num_classes, cfg.ghost_batch)
    return model.to(device=device, memory_format=torch.channels_last)


# =============================================================================
# Mixing
# =============================================================================
# torchvision.transforms.v2.MixUp/CutMix return only soft labels, not the
# (y_a, y_b, lam) triple that the loss and the train accuracy use here, so the
# two are written out below.


def _beta(rng: np.random.Generator | None, a: float) -> float:
    rng = rng if rng is not None else np.random.default_rng()
    return float(rng.beta(a, a))


def mixup_data(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator | None = None):
    """Blend each image with another from the batch: returns (mixed_x, y_a, y_b, lam)."""
    lam = _beta(rng, alpha)
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def cutmix_data(x: torch.Tensor, y: torch.Tensor, beta: float, rng: np.random.Generator | None = None):
    """Paste a box from another image of the batch: returns (mixed_x, y_a, y_b, lam).

    lam is the share of each image that is still its own after the box is
    clipped to the image border.
    """
    rng = rng if rng is not None else np.random.default_rng()
    lam = _beta(rng, beta)
    height, width = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    center_y, center_x = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, height)
    left, right = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, width)
    perm = torch.randperm(x.shape[0], device=x.device)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, y, y[perm], lam


def soft_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """Return lam * one_hot(y_a) + (1 - lam) * one_hot(y_b) as float targets."""
    return lam * F.one_hot(y_a, num_classes).float() + (1 - lam) * F.one_hot(y_b, num_classes).float()


# =============================================================================
# Optimizer
# =============================================================================


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al., 2019) around any torch optimizer.

    Every k calls of step() the slow weights move `alpha` of the way towards
    the fast weights and the fast weights restart from them. A step that
    GradScaler skips for inf/NaN gradients never reaches step(), so it counts
    for nothing here either.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if k < 1:
            raise ValueError(f"invalid Lookahead k {k}: must be at least 1")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"invalid Lookahead alpha {alpha}: must be in [0, 1]")
        self.base_optimizer = base_optimizer
        self.k, self.alpha = k, alpha
        self.fast_steps = 0
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self.slow_weights = [
            [p.detach().clone() for p in group["params"]] for group in self.param_groups
        ]

    # param_groups, state and defaults are the base optimizer's, read through
    # properties: its load_state_dict replaces those objects, and LR schedulers
    # and GradScaler must keep acting on the ones in use.
    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    @property
    def state(self) -> dict:
        return self.base_optimizer.state

    @property
    def defaults(self) -> dict:
        return self.base_optimizer.defaults

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, base={self.base_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _sync_slow_weights(self) -> None:
        for group, slow_group in zip(self.param_groups, self.slow_weights):
            for fast, slow in zip(group["params"], slow_group):
                slow.add_(fast.detach() - slow, alpha=self.alpha)
                fast.copy_(slow)

    def step(self, closure=None):
        loss = self.base_optimizer.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            self._sync_slow_weights()
        return loss

    def state_dict(self) -> dict:
        return {
            "base": self.base_optimizer.state_dict(),
            "slow_weights": [[w.clone() for w in group] for group in self.slow_weights],
            "fast_steps": self.fast_steps,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.fast_steps = int(state_dict["fast_steps"])
        self.k, self.alpha = int(state_dict["k"]), float(state_dict["alpha"])
        for slow_group, saved_group in zip(self.slow_weights, state_dict["slow_weights"]):
            for slow, saved in zip(slow_group, saved_group):
                slow.copy_(saved)

    def add_param_group(self, param_group: dict) -> None:
        self.base_optimizer.add_param_group(param_group)
        self.slow_weights.append([p.detach().clone() for p in self.param_groups[-1]["params"]])


def build_optimizer(model: nn.Module, cfg: Config) -> Lookahead:
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return Lookahead(sgd, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha)


# =============================================================================
# Training
# =============================================================================


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {requested}: no CUDA GPU is available to torch {torch.__version__}; use --device cpu")
    return torch.device(requested)


def precision_for(device: torch.device, cpu_bf16: bool) -> tuple[torch.dtype | None, bool]:
    """Return (autocast dtype or None for float32, whether a GradScaler is needed).

    CUDA uses bfloat16 where the GPU supports it, else float16 with a
    GradScaler. The CPU uses bfloat16 when cpu_bf16 is set and never a scaler,
    because bfloat16 has float32's exponent range.
    """
    # NOTE: the CUDA branches (here, the GradScaler and cudnn.benchmark in run)
    # have not yet been run on a GPU; the tests cover the CPU path only.
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return torch.float16, True
    return (torch.bfloat16 if cpu_bf16 else None), False


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def swa_first_epoch(cfg: Config) -> int:
    """Return the first epoch (1-based) trained at SWA_LR; cosine covers the ones before."""
    cosine_epochs = min(max(int(cfg.epochs * cfg.swa_start), 1), cfg.epochs)
    return cosine_epochs + 1


def light_first_epoch(cfg: Config) -> int:
    """Return the first epoch (1-based) with light augmentation and no mixing."""
    return cfg.epochs - int(cfg.epochs * cfg.final_frac) + 1


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    return math.ceil(train_size / batch_size)


def make_cosine(optimizer: torch.optim.Optimizer, cfg: Config, steps: int):
    """Build the schedule of the epochs before SWA, stepped once per batch.

    Without warm-up this is a cosine from BASE_LR down to ETA_MIN. With
    WARMUP_FRAC > 0 it is torch's OneCycleLR: a half cosine up from BASE_LR/25
    to BASE_LR over that share of the steps, then a cosine down to ETA_MIN;
    momentum stays at MOMENTUM.
    """
    total = max(steps * (swa_first_epoch(cfg) - 1), 1)
    warmup = cfg.warmup_frac * total
    if warmup < 1:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.eta_min)
    div_factor = 25.0
    # OneCycleLR counts its start as step 0 and reaches its last rate at
    # total_steps - 1, hence the + 1: ETA_MIN after the last cosine batch.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.base_lr, total_steps=total + 1, pct_start=warmup / total, anneal_strategy="cos",
        cycle_momentum=False, div_factor=div_factor,
        final_div_factor=cfg.base_lr / div_factor / cfg.eta_min if cfg.eta_min > 0 else math.inf)


def make_swalr(optimizer: torch.optim.Optimizer, cfg: Config) -> SWALR:
    """Build SWALR at a constant SWA_LR (anneal_epochs=0 sets it on creation)."""
    return SWALR(optimizer, swa_lr=cfg.swa_lr, anneal_epochs=0)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"the training loss became NaN or infinite at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


class TrainingInterrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Records SIGINT/SIGTERM so the loop can stop between batches; a second signal exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            print("\nSecond interrupt: exiting now. Files on disk stay whole because every write is atomic.",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this batch "
              "(press Ctrl-C again to exit at once).", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(self.signum)

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


@dataclasses.dataclass
class EpochStats:
    train_loss: float
    train_acc: float
    lr: float


def train_one_epoch(model, optimizer, scheduler, scaler, train_x, train_y, cfg: Config, epoch: int,
                    device: torch.device, amp_dtype, host_rng: np.random.Generator,
                    stop: StopFlag | None = None, progress: bool = False) -> EpochStats:
    """Train one pass over (train_x uint8 (N, 1, 28, 28), train_y) already on `device`.

    scheduler is stepped once per batch (the cosine phase) or is None (SWA,
    whose SWALR steps per epoch). Raises NonFiniteLoss and TrainingInterrupted.
    """
    model.train()
    strong = epoch < light_first_epoch(cfg)
    count = train_x.shape[0]
    steps = steps_per_epoch(count, cfg.batch_size)
    perm = torch.randperm(count, device=device)
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device)
    # Reading a GPU value waits for the GPU, so CUDA checks the loss only every
    # 50 steps; on the CPU the check costs nothing.
    check_every = 1 if device.type == "cpu" else 50
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    step_on_device = torch.zeros((), device=device, dtype=torch.long)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True)
    for step in range(1, steps + 1):
        rows = perm[(step - 1) * cfg.batch_size: step * cfg.batch_size]
        x = augment_batch(to_float(train_x[rows]), cfg, strong)
        x = normalize(x).contiguous(memory_format=torch.channels_last)
        y = train_y[rows]
        target, y_b, lam = y, None, 1.0
        if strong and host_rng.random() < cfg.mixprob:
            if host_rng.random() < cfg.use_cutmix_prob:
                x, _, y_b, lam = cutmix_data(x, y, cfg.cutmix_beta, host_rng)
            else:
                x, _, y_b, lam = mixup_data(x, y, cfg.mixup_alpha, host_rng)
            target = soft_targets(y, y_b, lam, cfg.num_classes)

        with autocast_context(device, amp_dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()

        with torch.no_grad():
            loss = loss.detach()
            step_on_device += 1
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step_on_device, first_bad_step)
            hits = (logits.argmax(1) == y).float()
            if y_b is not None:
                hits = lam * hits + (1 - lam) * (logits.argmax(1) == y_b).float()
            loss_sum += loss * len(rows)
            correct_sum += hits.sum()
        if step % check_every == 0 or step == steps:
            bad = int(first_bad_step)
            if bad >= 0:
                raise NonFiniteLoss(epoch, bad)
        if bar is not None:
            bar.update(1)
            if step % check_every == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{current_lr(optimizer):.2e}")
        if stop is not None:
            stop.check()
    if bar is not None:
        bar.close()
    return EpochStats(float(loss_sum) / count, 100.0 * float(correct_sum) / count, current_lr(optimizer))


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def rng_state(host_rng: np.random.Generator) -> dict:
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        # Plain lists and ints, because weights_only loading rejects numpy arrays.
        "numpy_global": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
        "host": host_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, host_rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy_global"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    host_rng.bit_generator.state = state["host"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# =============================================================================
# Evaluation and ensembling
# =============================================================================

# Fixed test-time views (dx, dy) in pixels: the image itself, then one-pixel
# shifts, then diagonal and two-pixel ones. TTA_RUNS takes the first ones.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1),
              (2, 0), (-2, 0), (0, 2), (0, -2))


def shift_images(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shift images (..., H, W) right by dx and down by dy pixels, filling with zeros (no wrap-around)."""
    if dx == 0 and dy == 0:
        return images
    height, width = images.shape[-2:]
    out = torch.zeros_like(images)
    src_y = slice(max(-dy, 0), height - max(dy, 0))
    dst_y = slice(max(dy, 0), height - max(-dy, 0))
    src_x = slice(max(-dx, 0), width - max(dx, 0))
    dst_x = slice(max(dx, 0), width - max(-dx, 0))
    out[..., dst_y, dst_x] = images[..., src_y, src_x]
    return out


@torch.no_grad()
def predict_proba(model: nn.Module, images_uint8: torch.Tensor, device: torch.device, tta_runs: int = 1,
                  batch_size: int = 1024, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return softmax probabilities (N, classes) as float32 on the CPU, averaged over the first tta_runs fixed shifts."""
    model.eval()
    outputs = []
    for start in range(0, images_uint8.shape[0], batch_size):
        batch = images_uint8[start: start + batch_size].to(device, non_blocking=True)
        batch = to_float(batch)
        total = None
        for dx, dy in TTA_SHIFTS[:tta_runs]:
            x = normalize(shift_images(batch, dx, dy)).contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp_dtype):
                probs = torch.softmax(model(x).float(), dim=1)
            total = probs if total is None else total + probs
        outputs.append((total / tta_runs).cpu())
    return torch.cat(outputs)


def accuracy_percent(probs: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return 100.0 * float((probs.argmax(1) == labels).float().mean())


def nll_loss(probs: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels))


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Return the 95 % Wilson score interval of a binomial proportion, in percent."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = correct / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if correct == 0 else max(center - half, 0.0)
    high = 1.0 if correct == total else min(center + half, 1.0)
    return (100.0 * low, 100.0 * high)


def format_accuracy(acc: float, total: int) -> str:
    low, high = wilson_interval(int(round(acc * total / 100)), total)
    return f"{acc:.2f} % (95 % CI {low:.2f}-{high:.2f}, n={total})"


def rank_key(entry: dict):
    """Sort key of a checkpoint: higher validation accuracy, then lower loss, then later epoch."""
    acc = entry["val_acc"] if entry["val_acc"] is not None else -1.0
    loss = entry["val_loss"] if entry["val_loss"] is not None else 0.0
    return (-acc, loss, -entry["epoch"])


def update_top_k(top_k: list[dict], candidate: dict, k: int) -> tuple[list[dict], list[dict]]:
    """Return (new top-k list, entries that dropped out), ranked by rank_key."""
    ranked = sorted(top_k + [candidate], key=rank_key)
    return ranked[:k], ranked[k:]


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights_only=True; a damaged file raises InputError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle_error()) as error:
        raise InputError(f"{path}: cannot read the checkpoint, it is truncated or not a torch file ({error}); "
                         "delete it or train again with --overwrite") from error


def pickle_error():
    import pickle

    return pickle.UnpicklingError


def model_from_checkpoint(checkpoint: dict, path: Path, device: torch.device) -> nn.Module:
    """Build the network that `checkpoint` describes and load its weights."""
    saved = checkpoint.get("config", {})
    try:
        model = WideSmallResNet(saved["width"], (3, 3, 3), saved["num_classes"], saved["ghost_batch"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        raise InputError(f"{path}: the weights do not fit a WideSmallResNet of the stored config ({error}); "
                         "delete the file or train again with --overwrite") from error
    return model.to(device=device, memory_format=torch.channels_last)


def run_checkpoints(results_dir: Path, prefix: str, kind: str) -> list[tuple[int, Path]]:
    """Return [(epoch, path)] of PREFIX_{kind}_epochN.pth files, by epoch; other names are ignored."""
    pattern = re.compile(re.escape(prefix) + "_" + kind + r"_epoch(\d+)\.pth")
    found = []
    if results_dir.is_dir():
        for path in results_dir.iterdir():
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def ensemble_members(results_dir: Path, prefix: str, top_k: int) -> list[tuple[str, Path, dict]]:
    """Return [(label, path, checkpoint)] for the top_k epoch checkpoints and the newest SWA checkpoint.

    The order is fixed (best epoch first, SWA last) so that a rebuilt
    ensemble sums probabilities in the same order and writes the same bytes.
    """
    epochs = []
    for epoch, path in run_checkpoints(results_dir, prefix, "ckpt"):
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint, dict) or "model" not in checkpoint:
            raise InputError(f"{path}: not a checkpoint of this script (no model weights); move it out of {results_dir}")
        epochs.append(({"epoch": epoch, "val_acc": checkpoint.get("val_acc"),
                        "val_loss": checkpoint.get("val_loss")}, path, checkpoint))
    epochs.sort(key=lambda item: rank_key(item[0]))
    members = [(f"epoch {entry['epoch']}", path, ckpt) for entry, path, ckpt in epochs[:top_k]]
    swa = run_checkpoints(results_dir, prefix, "swa")
    if swa:
        members.append(("SWA", swa[-1][1], load_checkpoint(swa[-1][1])))
    return members


@dataclasses.dataclass
class EnsembleResult:
    member_val_acc: dict  # label -> validation accuracy in percent (None without a validation set)
    val_acc: float | None
    val_probs: torch.Tensor | None
    test_probs: torch.Tensor
    members: list


def evaluate_ensemble(members, data: Dataset, device: torch.device, cfg: Config, amp_dtype,
                      stop: StopFlag | None = None) -> EnsembleResult:
    """Average the TTA softmax of every member over the validation and test images."""
    val_images = torch.from_numpy(data.val_x)
    test_images = torch.from_numpy(data.test_x)
    member_acc, val_sum, test_sum = {}, None, None
    for label, path, checkpoint in members:
        if stop is not None:
            stop.check()
        model = model_from_checkpoint(checkpoint, path, device)
        test_probs = predict_proba(model, test_images, device, cfg.tta_runs, cfg.eval_batch, amp_dtype)
        test_sum = test_probs if test_sum is None else test_sum + test_probs
        if len(data.val_y):
            val_probs = predict_proba(model, val_images, device, cfg.tta_runs, cfg.eval_batch, amp_dtype)
            val_sum = val_probs if val_sum is None else val_sum + val_probs
            member_acc[label] = accuracy_percent(val_probs, data.val_y)
        else:
            member_acc[label] = None
    val_probs = val_sum / len(members) if val_sum is not None else None
    val_acc = accuracy_percent(val_probs, data.val_y) if val_probs is not None else None
    return EnsembleResult(member_acc, val_acc, val_probs, test_sum / len(members), [m[1].name for m in members])


# =============================================================================
# Outputs
# =============================================================================


def atomic_write(path: Path, write) -> None:
    """Call write(temp_path), then move the temp file over `path` in one step.

    The temp file sits in the same folder so os.replace is atomic; if write
    fails, the previous file at `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def save_torch(obj, path: Path) -> None:
    atomic_write(path, lambda temp: torch.save(obj, temp))


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_submission(labels: np.ndarray, path: Path, sample_ids: np.ndarray | None = None) -> None:
    """Write Kaggle's ImageId,Label CSV: ImageId counts from 1 in test-row order."""
    labels = np.asarray(labels).astype(np.int64)
    ids = np.arange(1, len(labels) + 1)
    if sample_ids is not None and not np.array_equal(sample_ids, ids):
        raise InputError(f"sample_submission.csv lists {len(sample_ids)} ImageIds that do not match the "
                         f"{len(labels)} test rows numbered from 1; check that test.csv is complete")
    frame = pd.DataFrame({"ImageId": ids, "Label": labels})
    atomic_write(Path(path), lambda temp: frame.to_csv(temp, index=False))


def output_paths(cfg: Config) -> dict:
    results = Path(cfg.results_dir)
    prefix = save_prefix(cfg)
    return {
        "last": results / f"{prefix}_last.pth",
        "history": results / f"{prefix}_history.json",
        "summary": results / f"{prefix}_summary.json",
        "predict_summary": results / f"{prefix}_predict_summary.json",
        "submission": Path(cfg.submission_path),
    }


def existing_outputs(cfg: Config) -> list[Path]:
    results = Path(cfg.results_dir)
    prefix = save_prefix(cfg)
    found = sorted(p for p in results.iterdir() if p.name.startswith(prefix + "_")) if results.is_dir() else []
    submission = Path(cfg.submission_path)
    if submission.exists():
        found.append(submission)
    return found


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    plt = _pyplot()
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _style_epoch_axes(ax, swa_epoch: int, last_epoch: int, ylabel: str, title: str) -> None:
    """Label a per-epoch plot, shade the SWA phase and keep epoch ticks whole."""
    from matplotlib.ticker import MaxNLocator

    if swa_epoch <= last_epoch:
        ax.axvspan(swa_epoch - 0.5, last_epoch + 0.5, color="tab:green", alpha=0.12, label="SWA phase")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()


def plot_history(history: list[dict], swa_epoch: int, results_dir: Path, prefix: str) -> list[Path]:
    """Write the loss, accuracy and learning-rate curves; return their paths."""
    if not history:
        return []
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    written = []
    for key, ylabel, name in (("loss", "cross-entropy loss", "train_loss"), ("acc", "accuracy (%)", "acc")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train (augmented)")
        if any(h[f"val_{key}"] is not None for h in history):
            ax.plot(epochs, [h[f"val_{key}"] for h in history], marker="o", label="validation")
        _style_epoch_axes(ax, swa_epoch, epochs[-1], ylabel,
                          f"{prefix}: {'loss' if key == 'loss' else 'accuracy'} per epoch")
        if key == "acc":
            # Zoom in on the second half of the run, where MNIST runs differ.
            # Early outliers may fall below the axis, but a short run stays in view.
            late = history[len(history) // 2:]
            values = [h["val_acc"] for h in late if h["val_acc"] is not None] + [h["train_acc"] for h in late]
            ax.set_ylim(max(min(values) - 1.0, 0.0), 100.2)
        path = results_dir / f"{prefix}_{name}.png"
        _save_figure(fig, path)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(epochs, [h["lr"] for h in history], marker="o", label="learning rate at epoch end")
    ax.set_yscale("log")
    _style_epoch_axes(ax, swa_epoch, epochs[-1], "learning rate", f"{prefix}: learning-rate schedule")
    path = results_dir / f"{prefix}_lr.png"
    _save_figure(fig, path)
    written.append(path)
    return written


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def plot_diagnostics(result: EnsembleResult, data: Dataset, results_dir: Path, prefix: str, classes: int) -> list[Path]:
    """Write the confusion matrix, the misclassified validation digits and the least certain test digits."""
    plt = _pyplot()
    written = []
    if result.val_probs is not None:
        predictions = result.val_probs.argmax(1).numpy()
        matrix = confusion_matrix(data.val_y, predictions, classes)
        fig, ax = plt.subplots(figsize=(6.2, 5.4))
        image = ax.imshow(np.log1p(matrix), cmap="Blues")
        for (row, col), value in np.ndenumerate(matrix):
            if value:
                ax.text(col, row, str(value), ha="center", va="center", fontsize=7,
                        color="white" if row == col else "black")
        ax.set_xticks(range(classes))
        ax.set_yticks(range(classes))
        ax.set_xlabel("predicted digit")
        ax.set_ylabel("true digit")
        ax.set_title("validation confusion matrix (ensemble)")
        fig.colorbar(image, ax=ax, label="log(1 + images)")
        path = results_dir / f"{prefix}_confusion.png"
        _save_figure(fig, path)
        written.append(path)

        wrong = np.flatnonzero(predictions != data.val_y)
        confidence = result.val_probs.max(1).values.numpy()
        wrong = wrong[np.argsort(-confidence[wrong])][:40]
        captions = [f"true {data.val_y[i]}, pred {predictions[i]}\n{100 * confidence[i]:.0f} %" for i in wrong]
        path = results_dir / f"{prefix}_misclassified.png"
        _digit_grid(plt, data.val_x[wrong], captions, f"{prefix}: misclassified validation digits "
                    f"({len(np.flatnonzero(predictions != data.val_y))} in all, most confident first)", path)
        written.append(path)

    confidence = result.test_probs.max(1).values.numpy()
    unsure = np.argsort(confidence)[:40]
    predictions = result.test_probs.argmax(1).numpy()
    captions = [f"ImageId {i + 1}: {predictions[i]}\n{100 * confidence[i]:.0f} % sure" for i in unsure]
    path = results_dir / f"{prefix}_test_least_confident.png"
    _digit_grid(plt, data.test_x[unsure], captions, f"{prefix}: test digits the ensemble is least sure of", path)
    written.append(path)
    return written


def _digit_grid(plt, images: np.ndarray, captions: list[str], title: str, path: Path) -> None:
    columns = 10
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.25, rows * 1.55), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index], cmap="gray_r", vmin=0, vmax=255)
            ax.set_title(captions[index], fontsize=7)
    if not len(images):
        axes[0, 0].text(0, 0.5, "none", fontsize=12)
    fig.suptitle(title, fontsize=10)
    _save_figure(fig, path)


def package_versions() -> dict:
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                "pandas": pd.__version__}
    for name in ("torchvision", "matplotlib", "tqdm"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


# =============================================================================
# Run: training with checkpoints, then the ensemble and the submission
# =============================================================================


def _to_device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(device)


def _print_row(values: list[str], widths: list[int]) -> None:
    print("  ".join(v.rjust(w) for v, w in zip(values, widths)), flush=True)


ROW_WIDTHS = [7, 9, 10, 9, 9, 8, 15, 7, 8]
ROW_HEADER = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val 95 % CI", "time_s", "left"]


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def check_resume_config(saved: dict, cfg: Config, path: Path, predict_only: bool = False) -> Config:
    """Return the config to continue with: the saved one, with the runtime keys from cfg.

    When resuming, a change to a model key raises InputError. Changes to other
    keys (and, for predict_only, to model keys) are reported and replaced by
    the saved values, which exact continuation and the same validation split
    need.
    """
    current = config_dict(cfg)
    changed_model = [k for k in MODEL_KEYS if saved.get(k) != current[k]]
    if changed_model and not predict_only:
        details = ", ".join(f"--{k.replace('_', '-')} {current[k]} (saved: {saved.get(k)})" for k in changed_model)
        raise InputError(f"{path}: cannot resume, the model changed: {details}; "
                         "resume with the saved values, or start a new run with --overwrite or another --save-prefix")
    merged = dict(current)
    ignored = []
    saved = {**ADDED_KEYS_OLD_VALUES, **saved}
    for key, value in saved.items():
        if key in merged and key not in RUNTIME_KEYS and merged[key] != value:
            ignored.append(f"{key}={merged[key]!r} (kept {value!r})")
            merged[key] = value
    if ignored:
        action = "--predict-only uses" if predict_only else "resuming keeps"
        print(f"warning: {action} the settings saved in {path}; ignored: " + ", ".join(ignored), file=sys.stderr)
    return Config(**merged)


def fit(cfg: Config, data: Dataset, device: torch.device, stop: StopFlag | None = None,
        log_progress: bool | None = None) -> dict:
    """Train with checkpoints after every epoch; return the final state summary.

    Writes under RESULTS_DIR: the top-k epoch checkpoints, the SWA checkpoint,
    <prefix>_last.pth (everything needed to resume) and the history JSON.
    """
    results = Path(cfg.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    prefix = save_prefix(cfg)
    paths = output_paths(cfg)
    for temp in results.iterdir():  # temp files left by a killed process
        if temp.name.startswith(f".{prefix}_") and ".tmp" in temp.name:
            temp.unlink()
    amp_dtype, use_scaler = precision_for(device, cfg.cpu_bf16)
    if log_progress is None:
        log_progress = sys.stderr.isatty()

    host_rng = seed_everything(cfg.seed)
    model = build_model(cfg, device)
    forward_model = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    swa_model = None

    train_x = _to_device_images(data.train_x, device)
    train_y = torch.from_numpy(data.train_y).to(device)
    val_images = torch.from_numpy(data.val_x)
    steps = steps_per_epoch(len(data.train_y), cfg.batch_size)
    swa_epoch = swa_first_epoch(cfg)
    cosine = make_cosine(optimizer, cfg, steps)
    swalr = None
    history, top_k, start_epoch = [], [], 1
    fingerprint = data_fingerprint(data)

    if cfg.resume:
        checkpoint = load_checkpoint(paths["last"])
        saved_data = checkpoint.get("data_fingerprint")
        if saved_data is not None and saved_data != fingerprint:
            raise InputError(f"{paths['last']}: the data in --data-dir {cfg.data_dir} differ from the data of the "
                             "saved run; resume with the same files, or start a new run with --overwrite")
        start_epoch = int(checkpoint["epoch"]) + 1
        model.load_state_dict(checkpoint["model"])
        if checkpoint.get("swalr") is not None:
            swalr = make_swalr(optimizer, cfg)
        optimizer.load_state_dict(checkpoint["optimizer"])
        cosine.load_state_dict(checkpoint["cosine"])
        if swalr is not None:
            swalr.load_state_dict(checkpoint["swalr"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint.get("swa_model") is not None:
            swa_model = AveragedModel(model)
            swa_model.load_state_dict(checkpoint["swa_model"])
        history, top_k = checkpoint["history"], checkpoint["top_k"]
        restore_rng_state(checkpoint["rng"], host_rng)
        # A run killed between saving last.pth and deleting the checkpoints
        # that dropped out of the top k leaves them behind: delete them now.
        kept = {entry["path"] for entry in top_k}
        for _, path in run_checkpoints(results, prefix, "ckpt"):
            if path.name not in kept:
                path.unlink()
        print(f"Resuming from {paths['last']} after epoch {start_epoch - 1} of {cfg.epochs}.", flush=True)
        if start_epoch > cfg.epochs:
            print("All epochs are trained already; rebuilding the ensemble and the submission.", flush=True)

    if swa_epoch <= cfg.epochs:
        swa_text = f"SWA at a constant learning rate from epoch {swa_epoch}"
    else:
        swa_text = "no SWA epochs (the SWA model is the last epoch's weights)"
    light = light_first_epoch(cfg)
    light_text = f"light augmentation from epoch {light}" if light <= cfg.epochs else "no light-augmentation epochs"
    if start_epoch <= cfg.epochs:
        print(f"Training WideSmallResNet width {cfg.width} ({sum(p.numel() for p in model.parameters()):,} "
              f"parameters) on {len(data.train_y):,} images, validating on {len(data.val_y):,}; device {device}, "
              f"precision {str(amp_dtype).replace('torch.', '') if amp_dtype else 'float32'}"
              f"{' with GradScaler' if scaler else ''}; {swa_text}; {light_text}.", flush=True)
        _print_row(ROW_HEADER, ROW_WIDTHS)
    run_start = time.perf_counter()
    epoch_seconds = []

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        in_swa = epoch >= swa_epoch
        if in_swa and swalr is None:
            swalr = make_swalr(optimizer, cfg)
        stats = train_one_epoch(forward_model, optimizer, None if in_swa else cosine, scaler, train_x, train_y,
                                cfg, epoch, device, amp_dtype, host_rng, stop, log_progress)
        if in_swa:
            swalr.step()
        if epoch >= swa_epoch - 1:
            # The model at the end of the cosine phase is SWA's first sample.
            if swa_model is None:
                swa_model = AveragedModel(model)
            swa_model.update_parameters(model)

        val_acc = val_loss = None
        if len(data.val_y):
            probs = predict_proba(forward_model, val_images, device, 1, cfg.eval_batch, amp_dtype)
            val_acc, val_loss = accuracy_percent(probs, data.val_y), nll_loss(probs, data.val_y)
        seconds = time.perf_counter() - started
        epoch_seconds.append(seconds)
        record = {"epoch": epoch, "lr": stats.lr, "train_loss": stats.train_loss, "train_acc": stats.train_acc,
                  "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds,
                  "phase": "swa" if in_swa else "cosine",
                  "augmentation": "strong" if epoch < light_first_epoch(cfg) else "light"}
        history.append(record)

        candidate = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                     "path": f"{prefix}_ckpt_epoch{epoch}.pth"}
        top_k, dropped = update_top_k(top_k, candidate, cfg.top_k)
        if candidate in top_k:
            save_torch({"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                        "config": config_dict(cfg), "kind": "epoch"}, results / candidate["path"])
        save_json({"config": config_dict(cfg), "history": history}, paths["history"])
        save_torch({
            "format": 1, "epoch": epoch, "config": config_dict(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "cosine": cosine.state_dict(),
            "swalr": swalr.state_dict() if swalr is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "swa_model": swa_model.state_dict() if swa_model is not None else None,
            "history": history, "top_k": top_k, "rng": rng_state(host_rng), "data_fingerprint": fingerprint,
        }, paths["last"])
        # Delete dropped checkpoints only after last.pth no longer lists them.
        for entry in dropped:
            (results / entry["path"]).unlink(missing_ok=True)

        remaining = (cfg.epochs - epoch) * (sum(epoch_seconds) / len(epoch_seconds))
        ci = "-"
        if val_acc is not None:
            low, high = wilson_interval(int(round(val_acc * len(data.val_y) / 100)), len(data.val_y))
            ci = f"{low:.2f}-{high:.2f}"
        _print_row([f"{epoch}/{cfg.epochs}", f"{stats.lr:.2e}", f"{stats.train_loss:.4f}",
                    f"{stats.train_acc:.2f}", "-" if val_loss is None else f"{val_loss:.4f}",
                    "-" if val_acc is None else f"{val_acc:.2f}", ci, f"{seconds:.1f}",
                    _format_duration(remaining)], ROW_WIDTHS)

    if swa_model is not None and cfg.epochs >= swa_epoch - 1:
        swa_path = results / f"{prefix}_swa_epoch{cfg.epochs}.pth"
        if not swa_path.exists() or start_epoch <= cfg.epochs:
            refresh_swa_batchnorm(swa_model, train_x, cfg, device, amp_dtype)
            save_torch({"model": swa_model.module.state_dict(), "epoch": cfg.epochs, "val_acc": None,
                        "val_loss": None, "config": config_dict(cfg), "kind": "swa",
                        "n_averaged": int(swa_model.n_averaged)}, swa_path)
    return {"history": history, "train_seconds": time.perf_counter() - run_start, "swa_epoch": swa_epoch}


@torch.no_grad()
def refresh_swa_batchnorm(swa_model: AveragedModel, train_x: torch.Tensor, cfg: Config, device, amp_dtype) -> None:
    """Recompute the SWA model's batch-norm statistics over the training images with update_bn."""
    batches = (normalize(to_float(train_x[start: start + cfg.ghost_bn_update_batch])).contiguous(
        memory_format=torch.channels_last) for start in range(0, train_x.shape[0], cfg.ghost_bn_update_batch))
    with autocast_context(device, amp_dtype):
        update_bn(batches, swa_model)


def finish(cfg: Config, data: Dataset, device: torch.device, train_info: dict | None,
           stop: StopFlag | None = None) -> dict:
    """Build the ensemble from the checkpoints on disk, write the submission, plots and summary."""
    results = Path(cfg.results_dir)
    prefix = save_prefix(cfg)
    paths = output_paths(cfg)
    amp_dtype, _ = precision_for(device, cfg.cpu_bf16)
    started = time.perf_counter()
    members = ensemble_members(results, prefix, cfg.top_k)
    if not members:
        raise InputError(f"no checkpoints named {prefix}_ckpt_epoch*.pth or {prefix}_swa_epoch*.pth in {results}; "
                         "train first, or pass the --results-dir and --save-prefix of an earlier run")
    if paths["last"].exists():
        listed = {entry["path"] for entry in load_checkpoint(paths["last"])["top_k"]}
        missing = sorted(listed - {path.name for _, path, _ in members})
        if missing:
            print(f"warning: {', '.join(missing)} listed in {paths['last'].name} are missing from {results}; "
                  "the ensemble has fewer members than the run had", file=sys.stderr)
    result = evaluate_ensemble(members, data, device, cfg, amp_dtype, stop)
    labels = result.test_probs.argmax(1).numpy()
    write_submission(labels, paths["submission"], data.sample_submission_ids)

    validation = len(data.val_y)
    views = "1 test-time view" if cfg.tta_runs == 1 else f"{cfg.tta_runs} test-time views"
    print(f"Ensemble of {len(members)} checkpoints with {views}:", flush=True)
    for label, acc in result.member_val_acc.items():
        print(f"  {label:>10}: validation {format_accuracy(acc, validation) if acc is not None else 'n/a'}")
    if result.val_acc is not None:
        print(f"  {'ensemble':>10}: validation {format_accuracy(result.val_acc, validation)}")
    test_acc = None
    if data.test_y is not None:
        test_acc = accuracy_percent(result.test_probs, data.test_y)
        print(f"  {'ensemble':>10}: test {format_accuracy(test_acc, len(data.test_y))} (torchvision MNIST labels)")
    print(f"Wrote {paths['submission']} ({len(labels):,} rows).", flush=True)

    def interval(acc: float | None) -> list[float] | None:
        if acc is None:
            return None
        return list(wilson_interval(int(round(acc * validation / 100)), validation))

    summary = {
        "members": [{"label": label, "file": name, "val_acc": result.member_val_acc[label],
                     "val_ci95": interval(result.member_val_acc[label])}
                    for (label, _, _), name in zip(members, result.members)],
        "swa_val_acc": result.member_val_acc.get("SWA"),
        "swa_val_ci95": interval(result.member_val_acc.get("SWA")),
        "ensemble_val_acc": result.val_acc,
        "ensemble_val_ci95": interval(result.val_acc),
        "validation_images": validation,
        "test_acc": test_acc,
        "submission": str(paths["submission"]),
        "data": data.source,
        "device": str(device),
        "versions": package_versions(),
        "seconds": {"train": train_info["train_seconds"] if train_info else None,
                    "ensemble": time.perf_counter() - started},
        "config": config_dict(cfg),
    }
    history = train_info["history"] if train_info else []
    if history:
        plot_history(history, swa_first_epoch(cfg), results, prefix)
    plot_diagnostics(result, data, results, prefix, cfg.num_classes)
    return summary


def report_leakage(data: Dataset) -> dict:
    """Print how many test and validation images repeat training images pixel for pixel."""
    test_in_train = count_duplicates(data.train_x, data.test_x)
    val_in_train = count_duplicates(data.train_x, data.val_x) if len(data.val_x) else 0
    print(f"Duplicate check: {test_in_train} of {len(data.test_x):,} test images and {val_in_train} of "
          f"{len(data.val_x):,} validation images also occur, pixel for pixel, in the training images.", flush=True)
    if test_in_train > len(data.test_x) // 100:
        print("warning: many test images are in the training data (was public MNIST added to Kaggle's train.csv?); "
              "leaderboard scores of such a run say little about the model.", file=sys.stderr)
    if val_in_train:
        print("note: duplicated validation images make the validation accuracy slightly optimistic.", flush=True)
    return {"test_in_train": test_in_train, "val_in_train": val_in_train}


def check_output_locations(cfg: Config) -> None:
    """Raise InputError before any training when the results folder or the submission cannot be written."""
    results = Path(cfg.results_dir)
    if results.exists() and not results.is_dir():
        raise InputError(f"--results-dir {results} is a file; pass a folder")
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--results-dir {results}: cannot create the folder ({error})") from error
    if not os.access(results, os.W_OK | os.X_OK):
        raise InputError(f"--results-dir {results}: the folder is not writable; pick another one")
    submission = Path(cfg.submission_path)
    if not submission.name or submission.is_dir():
        raise InputError(f"--submission-path {cfg.submission_path!r} is a folder; pass a file name such as submission.csv")
    folder = submission.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--submission-path {submission}: cannot write in {folder}; pick another path")


def saved_config_path(cfg: Config) -> Path | None:
    """Return the file whose stored config describes the run in RESULTS_DIR, or None."""
    last = output_paths(cfg)["last"]
    if last.exists():
        return last
    results, prefix = Path(cfg.results_dir), save_prefix(cfg)
    checkpoints = run_checkpoints(results, prefix, "ckpt") + run_checkpoints(results, prefix, "swa")
    return checkpoints[0][1] if checkpoints else None


def run(cfg: Config, predict_only: bool = False) -> dict:
    """Run training (unless predict_only) and the ensemble: the whole program behind main()."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    paths = output_paths(cfg)
    check_output_locations(cfg)

    if not predict_only:
        if cfg.resume and not paths["last"].exists():
            raise InputError(f"--resume: {paths['last']} not found; start a new run without --resume")
        if not cfg.resume and not cfg.overwrite:
            existing = existing_outputs(cfg)
            if existing == [paths["submission"]]:
                raise InputError(f"{paths['submission']} exists already; pass --overwrite to replace it, "
                                 "or another --submission-path")
            if existing:
                names = ", ".join(str(p) for p in existing[:6]) + (" ..." if len(existing) > 6 else "")
                raise InputError(f"outputs of an earlier run exist: {names}; pass --resume to continue it, "
                                 "--overwrite to replace them, or another --save-prefix / --submission-path")
        if cfg.resume:
            saved = load_checkpoint(paths["last"]).get("config", {})
            cfg = check_resume_config(saved, cfg, paths["last"])
    else:
        saved_path = saved_config_path(cfg)
        if saved_path is not None:
            saved = load_checkpoint(saved_path).get("config", {})
            cfg = check_resume_config(saved, cfg, saved_path, predict_only=True)

    with StopFlag() as stop:
        return _run_steps(cfg, paths, device, predict_only, stop)


def _run_steps(cfg: Config, paths: dict, device: torch.device, predict_only: bool, stop: StopFlag) -> dict:
    data = load_data(cfg)
    stop.check()
    print(f"Data: {data.source}: {len(data.train_y):,} training, {len(data.val_y):,} validation, "
          f"{len(data.test_x):,} test images.", flush=True)
    leakage = report_leakage(data)

    if not predict_only and cfg.overwrite and not cfg.resume:
        results = Path(cfg.results_dir)
        doomed = run_checkpoints(results, save_prefix(cfg), "ckpt") + run_checkpoints(results, save_prefix(cfg), "swa")
        for _, path in doomed:
            path.unlink()
        paths["last"].unlink(missing_ok=True)
    train_info = None if predict_only else fit(cfg, data, device, stop)
    summary = finish(cfg, data, device, train_info, stop)
    summary["duplicates"] = leakage
    save_json(summary, paths["predict_summary" if predict_only else "summary"])
    return summary


# =============================================================================
# Command line
# =============================================================================


def build_arg_parser() -> argparse.ArgumentParser:
    """Build the parser: one flag per config constant, defaults read from the constants now."""
    parser = argparse.ArgumentParser(
        prog="ObsCure_MNIST.py",
        description="Train WideSmallResNet on Kaggle's Digit Recognizer data and write submission.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    for name, help_text in CONFIG_HELP.items():
        default = globals()[name]
        flags = ["--" + name.lower().replace("_", "-")]
        if name == "SUBMISSION_PATH":
            flags.append("--submission")
        if isinstance(default, bool):
            parser.add_argument(*flags, dest=name.lower(), action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(*flags, dest=name.lower(), type=type(default), default=default,
                                metavar=name, help=help_text)
    parser.add_argument("--predict-only", action="store_true",
                        help="write the submission from the checkpoints in --results-dir without training")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for input errors")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args = build_arg_parser().parse_args(argv)
    values = {name.lower(): getattr(args, name.lower()) for name in CONFIG_HELP}
    cfg = Config(**values)
    validate_config(cfg)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        cfg, args = parse_args(argv)
        run(cfg, predict_only=args.predict_only)
    except InputError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}. Checkpoints up to the previous epoch are kept; lower --base-lr or "
              "set --no-cpu-bf16 and train again.", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        last = output_paths(cfg)["last"]
        if last.exists():
            print(f"Interrupted by {error}. {last} holds the run up to its last finished epoch; "
                  "run the same command with --resume to continue.", file=sys.stderr)
        else:
            print(f"Interrupted by {error} before the first epoch finished; nothing to resume.", file=sys.stderr)
        return 128 + error.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())

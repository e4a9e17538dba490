"""Fashion-MNIST from its IDX files (the Debian package ``dataset-fashion-mnist``), and the small
CNN the fidelity table, the benchmark and the examples train.

No downloads: the files must be on disk.  Where: the ``path`` argument if given, else the
``FASHION_MNIST_DIR`` environment variable, then ``/usr/share/datasets/fashion-mnist``.  Both the
gzipped (``train-images-idx3-ubyte.gz``) and the plain file names are accepted.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch
import torch.nn as nn

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetMissing(FileNotFoundError):
    pass


def find_dir(path: str | None = None) -> str:
    # a directory the user names is the only one tried: silently reading another copy would hide a typo
    candidates = [path] if path else [p for p in (os.environ.get("FASHION_MNIST_DIR"), DEFAULT_DIR) if p]
    for d in candidates:
        if all(_resolve(d, f) for f in _FILES["train"] + _FILES["test"]):
            return d
    raise DatasetMissing(
        "Fashion-MNIST IDX files not found in " + ", ".join(repr(c) for c in candidates) +
        ". Install the Debian package: `apt-get install dataset-fashion-mnist` (files land in "
        f"{DEFAULT_DIR}), or point --data / FASHION_MNIST_DIR at a directory holding "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz].")


def available(path: str | None = None) -> bool:
    try:
        find_dir(path)
        return True
    except DatasetMissing:
        return False


def _resolve(d: str, name: str) -> str | None:
    for candidate in (os.path.join(d, name + ".gz"), os.path.join(d, name)):
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} bytes of data, header says {dims})")
    return data.reshape(dims)


def load(split: str = "train", path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: float32 (N, 1, 28, 28) normalised to mean 0 / std 1 over the training
    set, and int64 labels 0..9."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    d = find_dir(path)
    img_name, lbl_name = _FILES[split]
    images = _read_idx(_resolve(d, img_name))
    labels = _read_idx(_resolve(d, lbl_name))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - 0.2860) / 0.3530  # Fashion-MNIST training-set mean / std
    return x, torch.from_numpy(labels.astype(np.int64))


class SmallCNN(nn.Sequential):
    """Two conv layers and a linear classifier (~20k parameters): trains to ~85-90 % test
    accuracy on Fashion-MNIST in a few hundred steps on CPU."""

    def __init__(self, width: int = 16):
        super().__init__(
            nn.Conv2d(1, width, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 10))


class MLP(nn.Sequential):
    """784-256-10 fully connected classifier (~200k parameters), the study's momentum-SGD recipe."""

    def __init__(self, hidden: int = 256):
        super().__init__(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

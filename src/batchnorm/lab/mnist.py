"""MNIST from IDX files: checksum verification, download from the usual mirrors, a fixed split.

A directory may hold the four files (``train-*`` and ``t10k-*``), gzipped or raw. When only the
test set (``t10k-*``, 10,000 images) is there, it is split 8,000 / 2,000 with a fixed
permutation, so every run and seed is evaluated on the same 2,000 held-out images.

Pixels are scaled to ``[0, 1]``; images keep their 2-D shape ``(1, 28, 28)``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from batchnorm.lab.data import Dataset

__all__ = ["MD5", "MIRRORS", "default_dir", "download", "load_mnist", "read_idx"]

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# The published sums of the gzipped files, and of the decompressed test files (measured on the
# verified .gz). Raw training files have no sum here; their IDX header and exact size are checked.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

_HELD_OUT = 2_000
_SPLIT_SEED = 0  # fixed on purpose: the held-out images must not change with the experiment seed


def default_dir() -> Path:
    """``$BATCHNORM_DATA/mnist`` or ``~/.cache/batchnorm/mnist``."""
    root = os.environ.get("BATCHNORM_DATA")
    return Path(root) / "mnist" if root else Path.home() / ".cache" / "batchnorm" / "mnist"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _verify(path: Path) -> None:
    expected = MD5.get(path.name)
    if expected is None:
        return
    actual = _md5(path)
    if actual != expected:
        raise ValueError(
            f"MNIST file {path} has MD5 {actual}, expected {expected}: the file is corrupt or not "
            f"the original; delete it and download it again (or pass --data-dir to a verified copy)"
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped if its name ends in .gz) after checking its MD5 when known.

    Shape:
        images: ``(N, 28, 28)`` uint8; labels: ``(N,)`` uint8.
    """
    path = Path(path)
    _verify(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(
            f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) but the file holds "
            f"{len(raw) - offset}; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def download(data_dir: str | Path, names: tuple[str, ...] | None = None, timeout: float = 20.0) -> None:
    """Fetch the gzipped MNIST files into ``data_dir`` from the first mirror that answers.

    Each file is verified against its MD5 before it is moved into place.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = names or tuple(n for n in MD5 if n.endswith(".gz"))
    errors: list[str] = []
    for name in names:
        if (data_dir / name).is_file():
            continue
        for mirror in MIRRORS:
            partial = data_dir / (name + ".part")
            try:
                with urllib.request.urlopen(mirror + name, timeout=timeout) as response:
                    partial.write_bytes(response.read())
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{mirror}{name}: {exc}")
                continue
            if _md5(partial) == MD5[name]:
                partial.replace(data_dir / name)
                break
            partial.unlink()
            errors.append(f"{mirror}{name}: wrong MD5")
        else:
            raise RuntimeError(
                f"could not download MNIST file {name} into {data_dir} (offline?). Tried:\n  "
                + "\n  ".join(errors)
                + f"\nFix: copy the IDX files (gz or raw) into {data_dir} or pass --data-dir to a "
                "folder holding them, or use the offline default --dataset mnist1d"
            )


def load_mnist(data_dir: str | Path | None = None, *, allow_download: bool = True) -> Dataset:
    """MNIST as a :class:`Dataset`; downloads the files when they are missing and allowed.

    Uses the official 60,000 / 10,000 split when the training files are present, otherwise
    the test set split 8,000 / 2,000 with a fixed permutation.

    Shape:
        x: ``(N, 1, 28, 28)`` float32 in ``[0, 1]``; y: ``(N,)`` int64.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_dir()
    if _find(data_dir, "t10k-images-idx3-ubyte") is None:
        if not allow_download:
            raise FileNotFoundError(
                f"no MNIST files in {data_dir}: expected t10k-images-idx3-ubyte(.gz) and "
                f"t10k-labels-idx1-ubyte(.gz); pass --data-dir to the folder holding them"
            )
        download(data_dir)
    paths = {s: _find(data_dir, s) for s in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    if paths["t10k-labels-idx1-ubyte"] is None:
        raise FileNotFoundError(f"{data_dir} has MNIST test images but no t10k-labels-idx1-ubyte(.gz)")
    x_test = read_idx(paths["t10k-images-idx3-ubyte"])
    y_test = read_idx(paths["t10k-labels-idx1-ubyte"])
    train_images = _find(data_dir, "train-images-idx3-ubyte")
    train_labels = _find(data_dir, "train-labels-idx1-ubyte")
    if train_images is not None and train_labels is not None:
        x_train, y_train = read_idx(train_images), read_idx(train_labels)
    else:
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(y_test))
        train, held_out = order[:-_HELD_OUT], order[-_HELD_OUT:]
        x_train, y_train = x_test[train], y_test[train]
        x_test, y_test = x_test[held_out], y_test[held_out]

    def images(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255.0)[:, None, :, :]

    return Dataset(
        name="mnist",
        x_train=images(x_train),
        y_train=y_train.astype(np.int64),
        x_test=images(x_test),
        y_test=y_test.astype(np.int64),
        num_classes=10,
    )

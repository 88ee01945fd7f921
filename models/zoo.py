"""The model zoo: which MNIST ReLU classifiers exist, where they live, and how to get one.

The zoo reproduces the MNIST networks of Serra et al. (NeurIPS 2021): fully connected ReLU
classifiers 784 → h_1 → … → h_L → 10 trained with an ℓ1 penalty ``λ Σ |W|`` on every weight
matrix, for several widths/depths and three penalty levels (none, moderate, strong).

The small networks (2×100, 2×200, 3×100) are committed next to this file; the larger ones are
regenerated on demand, deterministically, into a cache directory (``models/.cache/`` by default,
git-ignored) by :func:`model_path`. This module needs only numpy, so the benchmark and the tests
can list and locate models and read the MNIST split without torch; building a missing model imports
``train.py`` (which needs the ``models`` extra: ``pip install .[models]``).

``models/`` is a directory of scripts, not a package: import this file with the directory on
``sys.path``::

    sys.path.insert(0, str(repo / "models"))
    import zoo
    path = zoo.model_path("mnist_2x400_l1_3e-4")
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = MODELS_DIR / ".cache"
DEFAULT_DATA_DIR = MODELS_DIR.parent.parent / "shared" / "data" / "mnist"
"""``../shared/data/mnist`` relative to the repository: the 10,000-image MNIST test split (gz idx)."""

DATA_DIR_ENV = "ONNX_EXACT_MNIST_DIR"
"""Environment variable that overrides :data:`DEFAULT_DATA_DIR`."""

ARCHITECTURES: dict[str, tuple[int, ...]] = {
    "2x100": (100, 100),
    "2x200": (200, 200),
    "2x400": (400, 400),
    "2x800": (800, 800),
    "3x100": (100, 100, 100),
    "4x100": (100, 100, 100, 100),
    "5x100": (100, 100, 100, 100, 100),
}
"""Hidden-layer widths of each architecture name, as in the paper's MNIST experiments."""

L1_LEVEL_NAMES = ("none", "moderate", "strong")

MODERATE_L1 = 3e-4
"""The paper's MNIST 2×100 value: with our training it costs at most half a point of held-out
accuracy and makes 40–55% of the neurons of the committed networks stable on [0,1]^784."""

STRONG_L1: dict[str, float] = {"4x100": 5e-4, "5x100": 4e-4}
"""The strong level per architecture, 1e-3 unless listed. Deeper networks need less: the penalty
acts on every layer, and at 1e-3 (4×100, 5×100) or 5e-4 (5×100) training collapsed to a constant
classifier (11.3% accuracy). The strong level trades a few points of accuracy for much more
stability (measured numbers: ``models/README.md``)."""

DEFAULT_STRONG_L1 = 1e-3


def l1_levels(arch: str) -> dict[str, float]:
    """The three ℓ1 coefficients of an architecture: ``{"none": 0, "moderate": …, "strong": …}``."""
    values = (0.0, MODERATE_L1, STRONG_L1.get(arch, DEFAULT_STRONG_L1))
    return dict(zip(L1_LEVEL_NAMES, values, strict=True))


COMMITTED_ARCHITECTURES = ("2x100", "2x200", "3x100")
"""Architectures whose models are committed under ``models/`` (all three ℓ1 levels)."""

MATMUL_ARCHITECTURES = ("2x100",)
"""Architectures also committed as the MatMul+Add export (rank-3 input ``[batch, 1, 784]``)."""

EXPORTERS = ("gemm", "matmul")
"""``gemm``: torch legacy exporter on a ``[batch, 784]`` input → ``Gemm(transB=1)`` → ``Relu`` ….
``matmul``: torch legacy exporter on a ``[batch, 1, 784]`` input → ``MatMul(x, Wᵀ)`` → ``Add(b)``."""

IDX_IMAGES = "t10k-images-idx3-ubyte.gz"
IDX_LABELS = "t10k-labels-idx1-ubyte.gz"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
EPOCHS = 120
SEED = 0
TRAIN_IMAGES = 8000
HELDOUT_IMAGES = 2000
SPLIT_SEED = 20210
"""Seed of the fixed permutation that splits the 10,000 images into 8,000 train / 2,000 held out."""


def format_l1(l1: float) -> str:
    """The ℓ1 coefficient as it appears in file names: ``0``, ``3e-4``, ``1e-3`` (one digit)."""
    if l1 == 0.0:
        return "0"
    mantissa, exponent = f"{l1:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class ZooModel:
    """One zoo member: an architecture, an ℓ1 coefficient and an export path."""

    arch: str
    l1: float
    exporter: str = "gemm"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; choose one of {list(ARCHITECTURES)}"
            )
        if self.exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {self.exporter!r}; choose one of {list(EXPORTERS)}")
        if self.l1 < 0.0:
            raise ValueError(f"the ℓ1 coefficient must be >= 0, got {self.l1}")

    @property
    def hidden(self) -> tuple[int, ...]:
        return ARCHITECTURES[self.arch]

    @property
    def name(self) -> str:
        suffix = "" if self.exporter == "gemm" else f"_{self.exporter}"
        return f"mnist_{self.arch}_l1_{format_l1(self.l1)}{suffix}"

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def committed(self) -> bool:
        """Whether the model ships in the repository (else it is built into the cache)."""
        if self.exporter == "matmul":
            return self.arch in MATMUL_ARCHITECTURES
        return self.arch in COMMITTED_ARCHITECTURES


def all_models() -> list[ZooModel]:
    """Every zoo member: each architecture × ℓ1 level as Gemm, plus the MatMul+Add variants."""
    gemm = [ZooModel(arch, l1) for arch in ARCHITECTURES for l1 in l1_levels(arch).values()]
    matmul = [
        ZooModel(arch, l1, "matmul")
        for arch in MATMUL_ARCHITECTURES
        for l1 in l1_levels(arch).values()
    ]
    return gemm + matmul


def committed_models() -> list[ZooModel]:
    """The members that ship in ``models/`` (what ``train.py --all --only-small`` rebuilds)."""
    return [model for model in all_models() if model.committed]


def find_model(name: str) -> ZooModel:
    """The zoo member called ``name`` (with or without ``.onnx``)."""
    stem = name.removesuffix(".onnx")
    for model in all_models():
        if model.name == stem:
            return model
    raise KeyError(f"no zoo model named {stem!r}; known: {[m.name for m in all_models()]}")


def data_dir() -> Path:
    """Where the MNIST idx files are: ``$ONNX_EXACT_MNIST_DIR`` or ``../shared/data/mnist``."""
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


@dataclass
class MnistSplit:
    """Images as float32 ``(n, 784)`` in [0,1], labels as int64 ``(n,)``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzip'd idx file (big-endian int32 magic and dimensions, then uint8 data)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass --data-dir or set ${DATA_DIR_ENV}")
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise ValueError(f"{path}: idx magic {found_magic}, expected {magic}")
    n_dims = magic & 0xFF
    dims = np.frombuffer(raw, dtype=">i4", count=n_dims, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dimensions {dims.tolist()}")
    return data.reshape(dims)


def load_mnist(data_dir: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """All images of the idx files, flattened to ``(n, 784)`` float32 in [0,1], and their labels."""
    data_dir = Path(data_dir)
    images = _read_idx(data_dir / IDX_IMAGES, IDX_IMAGES_MAGIC)
    labels = _read_idx(data_dir / IDX_LABELS, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{data_dir}: {images.shape[0]} images but {labels.shape[0]} labels")
    flat = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return flat, labels.astype(np.int64)


def load_split(data_dir: Path | str, split_seed: int = SPLIT_SEED) -> MnistSplit:
    """The fixed 8,000 train / 2,000 held-out split of the 10,000 MNIST test images.

    The permutation depends only on ``split_seed``; each part keeps the file order.
    """
    images, labels = load_mnist(data_dir)
    expected = TRAIN_IMAGES + HELDOUT_IMAGES
    if images.shape[0] != expected:
        raise ValueError(f"{data_dir}: {images.shape[0]} images, expected the {expected} of t10k")
    permutation = np.random.default_rng(split_seed).permutation(expected)
    heldout = np.sort(permutation[:HELDOUT_IMAGES])
    train = np.sort(permutation[HELDOUT_IMAGES:])
    return MnistSplit(images[train], labels[train], images[heldout], labels[heldout])


def model_path(
    model: ZooModel | str,
    cache_dir: Path | str | None = None,
    build: bool = True,
) -> Path:
    """The path of a zoo model's ONNX file, training and exporting it first if it is missing.

    Committed models are returned from ``models/``. Others live in ``cache_dir`` (default
    ``models/.cache/``); when absent and ``build`` is true they are trained deterministically
    (same seeds, same split: the same weights on the same machine) from :func:`data_dir`.

    Raises
    ------
    FileNotFoundError
        The model is missing and ``build`` is false, or the MNIST files are missing.
    """
    if isinstance(model, str):
        model = find_model(model)
    if model.committed:
        path = MODELS_DIR / model.filename
    else:
        path = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / model.filename
    if path.exists():
        return path
    if not build:
        raise FileNotFoundError(f"{path} does not exist; build it with models/train.py")
    import train  # torch is needed only to build a model

    train.build_models([model], path.parent, data_dir())
    return path

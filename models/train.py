"""Train the zoo's ℓ1-regularised ReLU MLPs on MNIST and export them to ONNX.

The recipe follows Serra et al. (NeurIPS 2021, "Scaling Up Exact Neural Network Compression by ReLU
Stability"): a fully connected ReLU classifier trained with SGD (lr 0.01, momentum 0.9, batch 128)
on the loss

    L(θ) = CE(f_θ(x), y) + λ Σ_l Σ_ij |W_l[i, j]|

where CE is the batch-mean cross-entropy and the ℓ1 term covers every weight matrix (not the
biases). The penalty pushes weights to zero, which makes many neurons' pre-activations keep one sign
over the whole input box [0,1]^784 — exactly what onnx-exact proves and removes.

Data (differs from the paper, which trained on the 55,000-image MNIST training set for many
epochs): the only MNIST files available here are the 10,000-image *test* split, so the images are
split by a fixed permutation into 8,000 for training and 2,000 held out for the reported accuracy.
Pixels are scaled to [0,1] and nothing else (no normalisation), so the ONNX input domain is exactly
[0,1]^784 and is recorded in each model's ``metadata_props``.

Determinism: fixed seeds for the split, the initialisation and the batch order;
``torch.use_deterministic_algorithms(True)`` and one thread. Re-running gives bit-identical weights
on the same machine and torch build (different CPUs may round differently).

Usage::

    python models/train.py --arch 2x100 --l1 2e-4 --out models/mnist_2x100_l1_2e-4.onnx
    python models/train.py --all --out-dir models/.cache [--only-small]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import zoo
from torch import nn

LEARNING_RATE = 0.01
MOMENTUM = 0.9
BATCH_SIZE = 128
OPSET = 17
EXPORT_TOLERANCE = 1e-5
"""Largest |torch − onnxruntime| logit difference accepted for an export, relative to the largest
|logit| (at least 1): both compute in float32 with different summation orders, so they agree to a
few ulps of the logits' scale, not absolutely."""


def make_mlp(hidden: Sequence[int], n_in: int = 784, n_out: int = 10) -> nn.Sequential:
    """``Linear → ReLU`` for each hidden width, then a final ``Linear`` to the logits."""
    widths = [n_in, *hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], n_out))
    return nn.Sequential(*layers)


def l1_penalty(mlp: nn.Sequential) -> torch.Tensor:
    """``Σ_l Σ_ij |W_l[i, j]|`` over every weight matrix (biases excluded, as in the paper)."""
    return sum(layer.weight.abs().sum() for layer in mlp if isinstance(layer, nn.Linear))


def train_mlp(
    hidden: Sequence[int],
    l1: float,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = zoo.EPOCHS,
    seed: int = zoo.SEED,
) -> nn.Sequential:
    """Train a ReLU MLP with SGD on cross-entropy + ``l1`` · Σ|W|, deterministically.

    The seed fixes the initialisation and the per-epoch batch order; the last partial batch is
    kept. Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    mlp = make_mlp(hidden, n_in=images.shape[1])
    optimizer = torch.optim.SGD(mlp.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    order_generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(images)
    targets = torch.from_numpy(labels)
    loss_fn = nn.CrossEntropyLoss()
    mlp.train()
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=order_generator)
        for start in range(0, inputs.shape[0], BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss = loss_fn(mlp(inputs[batch]), targets[batch])
            if l1 > 0.0:
                loss = loss + l1 * l1_penalty(mlp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return mlp.eval()


class _Rank3Input(nn.Module):
    """Wraps the MLP so it takes ``[batch, 1, 784]``: torch then exports ``MatMul`` + ``Add``."""

    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixels)


def input_shape(exporter: str, batch: int, n_in: int = 784) -> tuple[int, ...]:
    """The ONNX input shape of a zoo export: ``[batch, 784]`` (gemm) or ``[batch, 1, 784]``."""
    return (batch, n_in) if exporter == "gemm" else (batch, 1, n_in)


def export_onnx(mlp: nn.Sequential, exporter: str) -> onnx.ModelProto:
    """Export with torch's legacy TorchScript exporter (``dynamo=False``), dynamic batch axis.

    ``gemm`` traces the MLP on a 2-D input (``Gemm(transB=1)`` nodes); ``matmul`` traces it on a
    rank-3 input, for which torch writes ``MatMul`` with a pre-transposed weight and ``Add``.
    """
    n_in = mlp[0].in_features
    module = mlp if exporter == "gemm" else _Rank3Input(mlp)
    example = torch.zeros(input_shape(exporter, 1, n_in))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (it writes the Gemm / MatMul+Add graphs most
        # deployed models have); silence its deprecation notices for this call only.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            input_names=[zoo.INPUT_NAME],
            output_names=[zoo.OUTPUT_NAME],
            dynamic_axes={zoo.INPUT_NAME: {0: "batch"}, zoo.OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
    return onnx.load_from_string(buffer.getvalue())


def onnx_logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """onnxruntime logits ``(n, 10)`` of a zoo model for flattened images ``(n, 784)``."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_meta = session.get_inputs()[0]
    feed = images.astype(np.float32).reshape((images.shape[0], *input_meta.shape[1:]))
    (logits,) = session.run(None, {input_meta.name: feed})
    return logits.reshape(images.shape[0], -1)


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Insert or overwrite ``metadata_props`` keys."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def training_metadata(member: zoo.ZooModel, epochs: int, seed: int) -> dict[str, str]:
    """The domain key onnx-exact reads by default, and how the model was made."""
    prefix = "onnx_exact.train."
    return {
        f"onnx_exact.domain.{zoo.INPUT_NAME}": json.dumps({"lower": 0.0, "upper": 1.0}),
        prefix + "arch": member.arch,
        prefix + "hidden": json.dumps(list(member.hidden)),
        prefix + "l1": repr(member.l1),
        prefix + "epochs": str(epochs),
        prefix + "seed": str(seed),
        prefix + "split_seed": str(zoo.SPLIT_SEED),
        prefix + "optimizer": f"SGD lr={LEARNING_RATE} momentum={MOMENTUM} batch={BATCH_SIZE}",
        prefix + "data": (
            f"MNIST t10k (10,000 images), fixed split {zoo.TRAIN_IMAGES} train / "
            f"{zoo.HELDOUT_IMAGES} held out, pixels/255"
        ),
        prefix
        + "exporter": f"torch {torch.__version__} legacy TorchScript exporter (dynamo=False)",
        prefix + "graph": member.exporter,
    }


def finish_export(
    mlp: nn.Sequential, member: zoo.ZooModel, split: zoo.MnistSplit, epochs: int, seed: int
) -> tuple[onnx.ModelProto, float]:
    """Export, check against torch on the held-out images, and record metadata and accuracy.

    The recorded accuracy is onnxruntime's on the exported float32 model, so anyone re-running the
    ONNX file on the same 2,000 images gets exactly that number.
    """
    model = export_onnx(mlp, member.exporter)
    set_metadata(model, training_metadata(member, epochs, seed))
    logits = onnx_logits(model, split.heldout_images)
    with torch.no_grad():
        reference = mlp(torch.from_numpy(split.heldout_images)).numpy()
    deviation = float(np.max(np.abs(logits - reference)))
    allowed = EXPORT_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))
    if deviation > allowed:
        raise RuntimeError(
            f"{member.name}: onnxruntime and torch logits differ by {deviation:.3g} "
            f"(> {allowed:.3g}); the export is wrong"
        )
    correct = int(np.sum(np.argmax(logits, axis=1) == split.heldout_labels))
    accuracy = correct / split.heldout_labels.shape[0]
    set_metadata(
        model,
        {
            "onnx_exact.train.heldout_correct": str(correct),
            "onnx_exact.train.heldout_accuracy": f"{accuracy:.4f}",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model, accuracy


def save_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Write a single-file model via a temporary file and a rename, so that an interrupted build
    never leaves a truncated model where :func:`zoo.model_path` would find it."""
    partial = path.with_name(path.name + ".partial")
    onnx.save(model, partial, save_as_external_data=False)
    os.replace(partial, path)


def build_models(
    members: Sequence[zoo.ZooModel],
    out_dir: Path | str,
    data_dir: Path | str,
    epochs: int = zoo.EPOCHS,
    seed: int = zoo.SEED,
) -> list[Path]:
    """Train each distinct (architecture, ℓ1) once and write every requested export of it.

    Files are written to ``out_dir/<name>.onnx`` as single files (no external data).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = zoo.load_split(data_dir)
    written = []
    trainings = sorted({(m.arch, m.l1) for m in members}, key=lambda t: (t[0], t[1]))
    for arch, l1 in trainings:
        mlp = train_mlp(
            zoo.ARCHITECTURES[arch], l1, split.train_images, split.train_labels, epochs, seed
        )
        for member in (m for m in members if (m.arch, m.l1) == (arch, l1)):
            model, accuracy = finish_export(mlp, member, split, epochs, seed)
            path = out_dir / member.filename
            save_atomic(model, path)
            written.append(path)
            print(f"{path}: held-out accuracy {accuracy:.4f}", flush=True)
    return written


def train_one(
    arch: str,
    l1: float,
    out: Path | str,
    exporter: str = "gemm",
    data_dir: Path | str | None = None,
    epochs: int = zoo.EPOCHS,
    seed: int = zoo.SEED,
) -> float:
    """Train one model and save it to ``out``; returns its held-out accuracy."""
    member = zoo.ZooModel(arch, l1, exporter)
    split = zoo.load_split(data_dir if data_dir is not None else zoo.data_dir())
    mlp = train_mlp(member.hidden, l1, split.train_images, split.train_labels, epochs, seed)
    model, accuracy = finish_export(mlp, member, split, epochs, seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(model, Path(out))
    print(f"{out}: held-out accuracy {accuracy:.4f}", flush=True)
    return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", choices=list(zoo.ARCHITECTURES), help="train one architecture")
    what.add_argument("--all", action="store_true", help="build every zoo model")
    parser.add_argument("--l1", type=float, default=0.0, help="ℓ1 coefficient λ (with --arch)")
    parser.add_argument("--exporter", choices=zoo.EXPORTERS, default="gemm")
    parser.add_argument("--out", type=Path, help="output .onnx (with --arch)")
    parser.add_argument("--out-dir", type=Path, help="output directory (with --all)")
    parser.add_argument("--only-small", action="store_true", help="with --all: committed ones only")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST idx directory")
    parser.add_argument("--epochs", type=int, default=zoo.EPOCHS)
    parser.add_argument("--seed", type=int, default=zoo.SEED)
    args = parser.parse_args(argv)
    data_dir = args.data_dir if args.data_dir is not None else zoo.data_dir()
    if args.arch:
        if args.out is None:
            parser.error("--arch needs --out")
        train_one(args.arch, args.l1, args.out, args.exporter, data_dir, args.epochs, args.seed)
    else:
        if args.out_dir is None:
            parser.error("--all needs --out-dir")
        members = zoo.committed_models() if args.only_small else zoo.all_models()
        build_models(members, args.out_dir, data_dir, args.epochs, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

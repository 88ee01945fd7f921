"""Train the few-input network of ``models/``: 2 inputs, 7 ReLU layers, 1,020 neurons.

Why: issue 25 names a held-out "real 2-input net of 1,020 neurons in 7 layers" among the
low-dimensional domains the input-space branch and bound must decide within seconds. This
script trains a network of that shape, deterministically (seeded, CPU), so the envelope
benchmark has one besides ACAS Xu and the RL controllers: a regressor of a checkerboard
``sign(sin(6 x0) sin(6 x1))`` on ``[-1, 1]^2``, whose sharp edges make its neurons' kinks
cross the whole box (few are stable on it).

Usage::

    python models/train_lowdim.py            # writes models/checker2d_7x146.onnx

The box ``[-1, 1]^2`` is recorded in the model's metadata (``onnx_exact.domain.x``), so
``onnx-exact analyze models/checker2d_7x146.onnx`` needs no flags. Needs torch (the ``test``
extra).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import onnx
import torch

WIDTHS = (146, 146, 146, 146, 146, 146, 144)  # 1,020 ReLU neurons in 7 layers
STEPS = 6000
OUT = Path(__file__).resolve().parent / "checker2d_7x146.onnx"


def make_net() -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    previous = 2
    for width in WIDTHS:
        layers += [torch.nn.Linear(previous, width), torch.nn.ReLU()]
        previous = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(previous, 1))


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(torch.sin(6 * x[:, :1]) * torch.sin(6 * x[:, 1:]))


def train(steps: int = STEPS, seed: int = 0) -> tuple[torch.nn.Sequential, float]:
    """Adam on fresh uniform batches of 512 points; returns the net and its last batch loss."""
    torch.manual_seed(seed)
    net = make_net()
    optimiser = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        x = torch.rand(512, 2) * 2 - 1
        loss = ((net(x) - target(x)) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval(), float(loss)


def export(net: torch.nn.Sequential, loss: float, steps: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        net, torch.zeros(1, 2), buffer, input_names=["x"], output_names=["y"], dynamo=False
    )
    model = onnx.load_from_string(buffer.getvalue())
    for key, value in {
        "onnx_exact.domain.x": json.dumps({"lower": -1.0, "upper": 1.0}),
        "training": f"models/train_lowdim.py: {steps} Adam steps, seed 0, final loss {loss:.4f}",
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    net, loss = train(args.steps)
    onnx.save(export(net, loss, args.steps), args.out)
    print(f"wrote {args.out} (final batch loss {loss:.4f})")


if __name__ == "__main__":
    main()

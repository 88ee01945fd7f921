"""Train the few-input networks of ``models/``: regressors on ``[-1, 1]^n`` with 2 or 8 inputs.

Why: issue 25 names a held-out "real 2-input net of 1,020 neurons in 7 layers" among the
low-dimensional domains the input-space branch and bound must decide within seconds, and asks
for few-input domains in general (up to about 16 inputs), not for ACAS Xu. This script trains
such networks, deterministically (seeded, CPU), so the envelope benchmark has some besides ACAS
Xu and the RL controllers:

- ``checker2d_7x146``: 2 inputs, 7 ReLU layers (1,020 neurons), a regressor of a checkerboard
  ``sign(sin(6 x0) sin(6 x1))``, whose sharp edges make its neurons' kinks cross the whole box
  (few are stable on it);
- ``ring2d_7x146``: the same shape on the indicator of a disc of radius 0.6, with weight decay:
  a third of its neurons are stable, and some only by a narrow margin;
- ``smooth8_3x64``: 8 inputs, 3 ReLU layers of 64, a smooth regressor
  ``sin(x0 + ... + x7) + x0 x4 + x1 x5 + x2 x6 + x3 x7``: the split of an 8-dimensional box
  narrows a leaf in one dimension of eight, so its few stable neurons take many leaves.

Usage::

    python models/train_lowdim.py                  # writes every net below into models/
    python models/train_lowdim.py ring2d_7x146     # one of them

The box ``[-1, 1]^n`` is recorded in each model's metadata (``onnx_exact.domain.x``), so
``onnx-exact analyze models/checker2d_7x146.onnx`` needs no flags. Needs torch (the ``test``
extra).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

MODELS = Path(__file__).resolve().parent
BATCH = 512


def checkerboard(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(torch.sin(6 * x[:, :1]) * torch.sin(6 * x[:, 1:]))


def disc(x: torch.Tensor) -> torch.Tensor:
    return (torch.sqrt((x**2).sum(1, keepdim=True)) < 0.6).float()


def smooth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x.sum(1, keepdim=True)) + (x[:, :4] * x[:, 4:]).sum(1, keepdim=True)


@dataclass(frozen=True)
class Spec:
    """One network: input count, hidden widths, target, Adam steps, seed, weight decay."""

    inputs: int
    widths: tuple[int, ...]
    target: Callable[[torch.Tensor], torch.Tensor]
    steps: int
    seed: int
    weight_decay: float = 0.0


NETS = {
    "checker2d_7x146": Spec(2, (146,) * 6 + (144,), checkerboard, 6000, 0),
    "ring2d_7x146": Spec(2, (146,) * 6 + (144,), disc, 6000, 1, weight_decay=1e-4),
    "smooth8_3x64": Spec(8, (64, 64, 64), smooth, 3000, 0),
}


def make_net(spec: Spec) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    previous = spec.inputs
    for width in spec.widths:
        layers += [torch.nn.Linear(previous, width), torch.nn.ReLU()]
        previous = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(previous, 1))


def train(spec: Spec) -> tuple[torch.nn.Sequential, float]:
    """Adam (AdamW with weight decay) on fresh uniform batches of ``BATCH`` points of
    ``[-1, 1]^n``; returns the net and its last batch loss."""
    torch.manual_seed(spec.seed)
    net = make_net(spec)
    if spec.weight_decay:
        optimiser = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=spec.weight_decay)
    else:
        optimiser = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(spec.steps):
        x = torch.rand(BATCH, spec.inputs) * 2 - 1
        loss = ((net(x) - spec.target(x)) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval(), float(loss)


def export(name: str, spec: Spec, net: torch.nn.Sequential, loss: float) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        net,
        torch.zeros(1, spec.inputs),
        buffer,
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
    )
    model = onnx.load_from_string(buffer.getvalue())
    for key, value in {
        "onnx_exact.domain.x": json.dumps({"lower": -1.0, "upper": 1.0}),
        "training": (
            f"models/train_lowdim.py {name}: {spec.steps} Adam steps, seed {spec.seed}, "
            f"weight decay {spec.weight_decay:g}, final loss {loss:.4f}"
        ),
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(NETS)} (default: all)")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in NETS]
    if unknown:
        parser.error(f"unknown nets {unknown}; choose from {', '.join(NETS)}")
    for name in args.names or NETS:
        spec = NETS[name]
        net, loss = train(spec)
        out = MODELS / f"{name}.onnx"
        onnx.save(export(name, spec, net, loss), out)
        neurons = sum(spec.widths)
        print(f"wrote {out} ({neurons} ReLUs, final batch loss {loss:.4f})")


if __name__ == "__main__":
    main()

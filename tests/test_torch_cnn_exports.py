"""Real torch exports of CNN shapes the fixtures do not imitate: compressed exactly, checked.

MobileNet-style blocks (BatchNormalization, ReLU6, a depthwise conv), a dilated conv with
average pooling, a residual block with a strided projection shortcut and a spatial mean, and a
MATLAB-style 1-D conv with Flatten, each exported by torch's legacy exporter and (two of them)
by dynamo. Every conv with ``group == 1`` gets two planted dead channels (bias lowered by 50,
far below anything its inputs in ``[0, 1]`` reach), so each model has channels to remove; the
test asserts they go, that onnxruntime computes the same outputs on box samples, and that
``check`` proves the pair.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_exact import AnalysisOptions, DomainSpec, check, compress

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = [  # torch's own notices about its exporters, not findings of this test
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Mobile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, 1, 1, groups=8),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 12, 1),
            nn.BatchNorm2d(12),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class Dilated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, 1, 2, dilation=2),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 8, 3, 2, 0),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 3 * 3, 12),
            nn.ReLU(),
            nn.Linear(12, 3),
        )

    def forward(self, x):
        return self.body(x)


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 12, 3, 2, 1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 12, 3, 1, 1), nn.BatchNorm2d(12)
        self.shortcut, self.shortcut_bn = nn.Conv2d(8, 12, 1, 2), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        a = torch.relu(self.stem_bn(self.stem(x)))
        b = torch.relu(self.bn1(self.conv1(a)))
        c = torch.relu(self.bn2(self.conv2(b)) + self.shortcut_bn(self.shortcut(a)))
        return self.head(c.mean(dim=(2, 3)))


class Conv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 8, 5, 1, 2),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 12, 4),
        )

    def forward(self, x):
        return self.body(x)


MODELS = {
    "mobile": (Mobile, (1, 3, 12, 12)),
    "dilated": (Dilated, (1, 1, 16, 16)),
    "projection": (Projection, (1, 3, 8, 8)),
    "conv1d": (Conv1d, (1, 2, 24)),
}
CASES = [(name, "legacy") for name in MODELS] + [("mobile", "dynamo"), ("projection", "dynamo")]


def planted(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model in eval mode with random BN statistics and two dead channels per plain conv."""
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups == 1:
                module.bias[:2] -= 50.0
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval(), shape


def export(model: nn.Module, shape: tuple[int, ...], exporter: str) -> onnx.ModelProto:
    example = (torch.rand(shape),)
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")  # the dynamo exporter needs it; torch does not pull it in
        return torch.onnx.export(model, example, dynamo=True, input_names=["input"]).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, example, buffer, dynamo=False, opset_version=13, input_names=["input"])
    return onnx.load_from_string(buffer.getvalue())


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_a_torch_cnn_export_loses_its_dead_channels_exactly(name, exporter):
    model, shape = planted(name)
    original = export(model, shape, exporter)
    box = DomainSpec(lower=np.zeros(shape[1:]), upper=np.ones(shape[1:]))
    result = compress(original, None, box, AnalysisOptions(time_limit=3))
    report = result.report
    assert report.passed
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    removed = sum(len(layer.channels.removed) for layer in report.layers if layer.channels)
    assert removed >= 2
    for x in np.random.default_rng(1).uniform(0.0, 1.0, (16, *shape)).astype(np.float32):
        for before, after in zip(run(original, x), run(result.model, x), strict=True):
            np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    proof = check(original, result.model, box, samples=256, time_limit=30).proof
    assert proof is not None and proof.proved

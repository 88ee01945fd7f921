"""The model zoo: shipped models load, carry their domain, reach their recorded accuracy, and the
training script is deterministic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
sys.path.insert(0, str(MODELS_DIR))

import zoo  # noqa: E402

COMMITTED = zoo.committed_models()
DOMAIN_KEY = f"onnx_exact.domain.{zoo.INPUT_NAME}"


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


@pytest.fixture(scope="module")
def mnist_split() -> zoo.MnistSplit:
    if not (zoo.data_dir() / zoo.IDX_IMAGES).exists():
        pytest.skip(f"MNIST idx files not found in {zoo.data_dir()}")
    return zoo.load_split(zoo.data_dir())


@pytest.fixture(scope="module")
def train_module():
    pytest.importorskip("torch")
    import train

    return train


def test_zoo_lists_the_papers_grid() -> None:
    names = {m.name for m in zoo.all_models()}
    n_levels = len(zoo.L1_LEVEL_NAMES)
    assert len(names) == (len(zoo.ARCHITECTURES) + len(zoo.MATMUL_ARCHITECTURES)) * n_levels
    assert "mnist_2x100_l1_3e-4" in names
    assert "mnist_5x100_l1_4e-4" in names  # strong ℓ1 is smaller for deep nets
    assert zoo.l1_levels("2x100") == {"none": 0.0, "moderate": 3e-4, "strong": 1e-3}
    assert "mnist_2x100_l1_0_matmul" in names
    assert zoo.find_model("mnist_2x800_l1_0.onnx") == zoo.ZooModel("2x800", 0.0)
    assert {m.arch for m in COMMITTED} == set(zoo.COMMITTED_ARCHITECTURES)
    with pytest.raises(KeyError):
        zoo.find_model("mnist_3x3_l1_0")
    with pytest.raises(ValueError):
        zoo.ZooModel("2x100", 1e-4, exporter="keras")


def test_committed_zoo_stays_small() -> None:
    total = sum((MODELS_DIR / m.filename).stat().st_size for m in COMMITTED)
    assert total < 10 * 2**20


@pytest.mark.parametrize("member", COMMITTED, ids=lambda m: m.name)
def test_committed_model_is_valid_and_carries_its_domain(member: zoo.ZooModel) -> None:
    path = zoo.model_path(member, build=False)
    assert path == MODELS_DIR / member.filename
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )
    meta = _metadata(model)
    assert json.loads(meta[DOMAIN_KEY]) == {"lower": 0.0, "upper": 1.0}
    assert meta["onnx_exact.train.arch"] == member.arch
    assert float(meta["onnx_exact.train.l1"]) == member.l1
    assert int(meta["onnx_exact.train.epochs"]) == zoo.EPOCHS
    (graph_input,) = model.graph.input
    assert graph_input.name == zoo.INPUT_NAME
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == ([784] if member.exporter == "gemm" else [1, 784])
    ops = [node.op_type for node in model.graph.node]
    n_layers = len(member.hidden) + 1
    if member.exporter == "gemm":
        assert ops.count("Gemm") == n_layers and "MatMul" not in ops
    else:
        assert ops.count("MatMul") == n_layers and ops.count("Add") == n_layers
    assert ops.count("Relu") == len(member.hidden)


@pytest.mark.parametrize("member", COMMITTED, ids=lambda m: m.name)
def test_committed_model_reaches_its_recorded_accuracy(
    member: zoo.ZooModel, mnist_split: zoo.MnistSplit
) -> None:
    import onnxruntime as ort

    model = onnx.load(zoo.model_path(member, build=False))
    meta = _metadata(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = mnist_split.heldout_images
    feed = images.reshape((images.shape[0], *([784] if member.exporter == "gemm" else [1, 784])))
    (logits,) = session.run(None, {zoo.INPUT_NAME: feed})
    predicted = np.argmax(logits.reshape(images.shape[0], -1), axis=1)
    accuracy = float(np.mean(predicted == mnist_split.heldout_labels))
    assert abs(accuracy - float(meta["onnx_exact.train.heldout_accuracy"])) <= 1e-3
    assert int(meta["onnx_exact.train.heldout_correct"]) == int(
        np.sum(predicted == mnist_split.heldout_labels)
    )
    assert accuracy > 0.85


def test_split_is_fixed_and_disjoint(mnist_split: zoo.MnistSplit) -> None:
    assert mnist_split.train_images.shape == (zoo.TRAIN_IMAGES, 784)
    assert mnist_split.heldout_images.shape == (zoo.HELDOUT_IMAGES, 784)
    assert mnist_split.train_images.dtype == np.float32
    assert 0.0 <= mnist_split.train_images.min() and mnist_split.train_images.max() <= 1.0
    again = zoo.load_split(zoo.data_dir())
    np.testing.assert_array_equal(again.heldout_labels, mnist_split.heldout_labels)
    train_rows = {row.tobytes() for row in mnist_split.train_images}
    overlap = sum(row.tobytes() in train_rows for row in mnist_split.heldout_images)
    assert overlap <= 5  # MNIST t10k holds a few exact duplicate images, no more


def test_training_is_deterministic(train_module) -> None:
    import torch

    rng = np.random.default_rng(0)
    images = rng.random((300, 784), dtype=np.float32)
    labels = rng.integers(0, 10, 300)
    first = train_module.train_mlp((16,), 1e-3, images, labels, epochs=1, seed=3)
    second = train_module.train_mlp((16,), 1e-3, images, labels, epochs=1, seed=3)
    other_seed = train_module.train_mlp((16,), 1e-3, images, labels, epochs=1, seed=4)
    for a, b, c in zip(
        first.state_dict().values(),
        second.state_dict().values(),
        other_seed.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_l1_penalty_shrinks_weights(train_module) -> None:
    import torch

    rng = np.random.default_rng(1)
    images = rng.random((512, 784), dtype=np.float32)
    labels = rng.integers(0, 10, 512)
    plain = train_module.train_mlp((16,), 0.0, images, labels, epochs=2, seed=0)
    sparse = train_module.train_mlp((16,), 0.1, images, labels, epochs=2, seed=0)
    with torch.no_grad():
        expected = sum(float(layer.weight.abs().sum()) for layer in sparse[::2])
        assert float(train_module.l1_penalty(sparse)) == pytest.approx(expected, rel=1e-6)
        assert float(train_module.l1_penalty(sparse)) < 0.5 * float(train_module.l1_penalty(plain))


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_build_writes_a_checked_annotated_model(
    train_module, mnist_split: zoo.MnistSplit, tmp_path: Path, exporter: str
) -> None:
    member = zoo.ZooModel("2x100", 3e-4, exporter)
    (path,) = train_module.build_models([member], tmp_path, zoo.data_dir(), epochs=1, seed=0)
    assert path == tmp_path / member.filename
    model = onnx.load(path)
    meta = _metadata(model)
    assert json.loads(meta[DOMAIN_KEY]) == {"lower": 0.0, "upper": 1.0}
    assert meta["onnx_exact.train.epochs"] == "1"
    assert 0.2 < float(meta["onnx_exact.train.heldout_accuracy"]) <= 1.0  # chance is 0.1
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch", (
        "dynamic batch axis lost"
    )


def test_missing_cache_model_is_not_built_when_told_not_to(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        zoo.model_path("mnist_2x800_l1_1e-3", cache_dir=tmp_path, build=False)


@pytest.mark.parametrize("name", ["mnist_2x100_l1_1e-3", "mnist_2x100_l1_1e-3_matmul"])
def test_onnx_exact_compresses_a_shipped_model_without_flags(
    name: str, mnist_split: zoo.MnistSplit, tmp_path: Path
) -> None:
    """The issue's acceptance check: the recorded domain is enough, and the output classifies
    the held-out images exactly as the original does."""
    import onnxruntime as ort

    from onnx_exact import compress

    member = zoo.find_model(name)
    source = zoo.model_path(member, build=False)
    out = tmp_path / "small.onnx"
    result = compress(source, out)
    assert "metadata" in result.report.domain_source
    assert result.report.params_after < result.report.params_before
    shape = (-1, 784) if member.exporter == "gemm" else (-1, 1, 784)
    feed = {zoo.INPUT_NAME: mnist_split.heldout_images.reshape(shape)}
    logits = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for path in (source, out)
    ]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert np.array_equal(np.argmax(logits[1], axis=-1), np.argmax(logits[0], axis=-1))


@pytest.mark.parametrize("name", ["checker2d_7x146", "ring2d_7x146", "smooth8_3x64"])
def test_shipped_few_input_nets_carry_their_box_and_are_analysed_soundly(name: str) -> None:
    """The few-input nets of ``models/train_lowdim.py`` read their ``[-1, 1]^n`` box from their
    metadata, and what a short analysis proves holds on a dense sample of that box: a neuron
    proved ACTIVE (INACTIVE) is never seen negative (positive), and every pre-activation seen
    lies within the proved bounds."""
    from onnx_exact.core.verdicts import NeuronState
    from onnx_exact.pipeline import AnalysisOptions, analyze

    path = MODELS_DIR / f"{name}.onnx"
    assert "train_lowdim.py" in _metadata(onnx.load(path))["training"]
    analysis = analyze(path, options=AnalysisOptions(time_limit=3, jobs=1))
    net, box = analysis.read.network, analysis.box
    assert "metadata" in analysis.report.domain_source
    assert np.all(box.lower == -1.0) and np.all(box.upper == 1.0)
    assert box.size == net.in_features == (8 if name.startswith("smooth8") else 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(box.lower, box.upper, (20_000, box.size))
    proved = 0
    for dense, layer, y in zip(
        net.layers, analysis.stability.layers, net.preactivations(x), strict=True
    ):
        assert np.all(y >= np.asarray(layer.lower) - 1e-9)
        assert np.all(y <= np.asarray(layer.upper) + 1e-9)
        if not dense.relu:
            continue
        states = np.asarray(layer.states)
        assert np.all(y[:, states == NeuronState.ACTIVE] >= 0.0)
        assert np.all(y[:, states == NeuronState.INACTIVE] <= 0.0)
        proved += int(np.sum((states == NeuronState.ACTIVE) | (states == NeuronState.INACTIVE)))
    assert proved > 0

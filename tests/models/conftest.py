"""Fixtures that build real model files with the frameworks themselves, once per session:
torch (ResNet-18, an LSTM text classifier, a DQN policy, a small CNN exported to ONNX, a
TorchScript archive), Hugging Face (tiny BERT and GPT-2), Keras (a CNN as .keras, .h5 and a
SavedModel) and scikit-learn (a random forest as pickle, joblib and skops).

Each fixture returns {name: Built}: the path and what the framework itself says the model
is (its own parameter count), the independent reference the tests compare against.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@dataclass(frozen=True)
class Built:
    """A model file a framework wrote, and the framework's own count of its parameters."""

    path: Path
    parameters: int | None
    facts: dict[str, Any] = field(default_factory=dict)


# --- torch models, written out in plain torch ----------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (same module names), BasicBlock × [2, 2, 2, 2]."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks: list[nn.Module] = []
        inplanes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks.append(
                nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LSTMClassifier(nn.Module):
    """Text classification: token embedding → LSTM → linear over the last hidden state."""

    def __init__(self, vocab: int = 500, embed: int = 16, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(self.embedding(tokens))
        return self.fc(hidden[-1])


class QNetwork(nn.Module):
    """A DQN policy as stable-baselines3 names it: `q_net` maps observations to Q-values."""

    def __init__(self, observations: int = 4, actions: int = 2) -> None:
        super().__init__()
        self.q_net = nn.Sequential(
            nn.Linear(observations, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, actions),
        )  # fmt: skip

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_net(obs)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="session")
def torch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("torch")
    built: dict[str, Built] = {}

    resnet = ResNet18().eval()
    count = parameter_count(resnet)
    torch.save(resnet.state_dict(), out / "resnet18.pth")
    torch.save(resnet, out / "resnet18_module.pt")
    torch.jit.trace(resnet, torch.randn(1, 3, 64, 64)).save(str(out / "resnet18_script.pt"))
    save_file(resnet.state_dict(), str(out / "resnet18.safetensors"))
    for key, name in (
        ("resnet18_state_dict", "resnet18.pth"),
        ("resnet18_module", "resnet18_module.pt"),
        ("resnet18_torchscript", "resnet18_script.pt"),
        ("resnet18_safetensors", "resnet18.safetensors"),
    ):
        built[key] = Built(out / name, count, {"classes": 1000})

    lstm = LSTMClassifier()
    torch.save(lstm.state_dict(), out / "lstm.pt")
    torch.save(lstm, out / "lstm_module.pt")
    built["lstm_state_dict"] = Built(out / "lstm.pt", parameter_count(lstm))
    built["lstm_module"] = Built(
        out / "lstm_module.pt", parameter_count(lstm), {"class": LSTMClassifier.__module__}
    )

    dqn = QNetwork()
    torch.save(dqn.state_dict(), out / "dqn.pt")
    built["dqn_state_dict"] = Built(out / "dqn.pt", parameter_count(dqn))

    cnn = SmallCNN().eval()
    torch.onnx.export(
        cnn, (torch.randn(1, 1, 28, 28),), str(out / "cnn.onnx"), dynamo=False,
        input_names=["image"], dynamic_axes={"image": {0: "batch"}},
    )  # fmt: skip
    built["cnn_onnx"] = Built(out / "cnn.onnx", parameter_count(cnn))

    shared = nn.Linear(8, 8)  # one Linear under two names: its weights count once
    tied = nn.ModuleDict({"encoder": shared, "decoder": shared})
    torch.save(tied.state_dict(), out / "tied.pt")
    built["tied_state_dict"] = Built(out / "tied.pt", parameter_count(tied))

    optimizer = torch.optim.Adam(dqn.parameters())
    checkpoint = {
        "epoch": 3,
        "model_state_dict": dqn.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
    }
    torch.save(checkpoint, out / "checkpoint.pt")
    built["dqn_checkpoint"] = Built(out / "checkpoint.pt", parameter_count(dqn))
    torch.save(dqn.state_dict(), out / "dqn_legacy.pt", _use_new_zipfile_serialization=False)
    built["dqn_legacy"] = Built(out / "dqn_legacy.pt", parameter_count(dqn))
    return built


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf")
    bert = BertForSequenceClassification(
        BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            vocab_size=99,
        )
    )  # fmt: skip
    bert.save_pretrained(out / "bert")
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, bos_token_id=0, eos_token_id=0)
    )
    gpt2.save_pretrained(out / "gpt2")
    # The same GPT-2 as a pickle-based pytorch_model.bin: lm_head and wte share one storage.
    (out / "gpt2_bin").mkdir()
    (out / "gpt2_bin" / "config.json").write_bytes((out / "gpt2" / "config.json").read_bytes())
    torch.save(gpt2.state_dict(), out / "gpt2_bin" / "pytorch_model.bin")
    return {
        "bert": Built(out / "bert", bert.num_parameters()),
        "gpt2": Built(out / "gpt2", gpt2.num_parameters()),
        "gpt2_bin": Built(out / "gpt2_bin", gpt2.num_parameters()),
    }


@pytest.fixture(scope="session")
def keras_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("keras")
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    # One training step, so the files also hold optimizer state that is not parameters.
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(np.zeros((4, 28, 28, 1)), np.zeros(4), epochs=1, verbose=0)
    model.save(out / "cnn.keras")
    model.save(out / "cnn.h5")
    model.export(str(out / "cnn_savedmodel"), verbose=False)
    model.save_weights(out / "cnn.weights.h5")
    count = model.count_params()
    # A Lambda layer stores its function as marshalled Python bytecode in the config.
    scaled = keras.Sequential(
        [keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2.0), keras.layers.Dense(2)]
    )
    scaled.save(out / "lambda.keras")
    return {
        "lambda": Built(out / "lambda.keras", scaled.count_params()),
        "keras": Built(out / "cnn.keras", count),
        "keras_h5": Built(out / "cnn.h5", count),
        "keras_weights": Built(out / "cnn.weights.h5", count),
        "savedmodel": Built(out / "cnn_savedmodel", count),
    }


@pytest.fixture(scope="session")
def sklearn_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    import joblib
    import skops.io
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = tmp_path_factory.mktemp("sklearn")
    features, labels = make_classification(
        n_samples=200, n_features=6, n_informative=4, n_classes=3, random_state=0
    )
    forest = RandomForestClassifier(n_estimators=7, max_depth=5, random_state=0)
    forest.fit(features, labels)
    nodes = sum(tree.tree_.node_count for tree in forest.estimators_)
    facts = {"n_features_in": 6, "n_classes": 3, "n_estimators": 7, "node_count": nodes}
    with (out / "forest.pkl").open("wb") as handle:
        pickle.dump(forest, handle)
    joblib.dump(forest, out / "forest.joblib")
    joblib.dump(forest, out / "forest_compressed.joblib", compress=3)
    skops.io.dump(forest, out / "forest.skops")

    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    pipeline.fit(features, labels)
    scaler, logistic = pipeline[0], pipeline[-1]
    coefficients = (
        logistic.coef_.size + logistic.intercept_.size + scaler.mean_.size
        + scaler.var_.size + scaler.scale_.size
    )  # fmt: skip
    joblib.dump(pipeline, out / "pipeline.joblib")
    built = {
        key: Built(out / name, nodes, facts)
        for key, name in (
            ("forest_pickle", "forest.pkl"),
            ("forest_joblib", "forest.joblib"),
            ("forest_joblib_compressed", "forest_compressed.joblib"),
            ("forest_skops", "forest.skops"),
        )
    }
    built["pipeline_joblib"] = Built(
        out / "pipeline.joblib",
        coefficients,
        {"n_features_in": 6, "n_classes": 3, "coef_": list(logistic.coef_.shape)},
    )
    return built


# --- hostile files -------------------------------------------------------------------------


class SystemCall:
    """Unpickling this would run `os.system(command)`."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


@pytest.fixture
def system_call() -> type[SystemCall]:
    """The class whose pickle runs a shell command when loaded."""
    return SystemCall


@pytest.fixture
def malicious_pickle() -> Callable[..., bytes]:
    """A pickle that would run `touch MARKER`: malicious_pickle(marker, protocol=4)."""

    def make(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
        return pickle.dumps(SystemCall(f"touch {marker}"), protocol=protocol)

    return make


@pytest.fixture
def replace_member() -> Callable[[Path, Path, str, bytes], None]:
    """Copy a zip archive, swapping the member whose name ends with a suffix."""

    def replace(source: Path, target: Path, member_suffix: str, data: bytes) -> None:
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
            for info in src.infolist():
                payload = data if info.filename.endswith(member_suffix) else src.read(info)
                dst.writestr(info, payload)

    return replace

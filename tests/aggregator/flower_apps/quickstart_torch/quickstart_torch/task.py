"""quickstart-torch: the model, the data and the training loop."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TEST_FRACTION = 0.2


class Net(nn.Module):
    """A small MLP for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_data(
    partition_id: int, num_partitions: int, batch_size: int, seed: int, server_round: int
):
    """This partition's train and test loaders: digits, shuffled once with `seed`, split
    into `num_partitions` equal parts (every node computes the same split)."""
    features, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    part = np.array_split(order, num_partitions)[partition_id]
    x = torch.tensor(features[part] / 16.0, dtype=torch.float32)
    y = torch.tensor(labels[part], dtype=torch.int64)
    n_test = int(len(part) * TEST_FRACTION)
    train = TensorDataset(x[n_test:], y[n_test:])
    test = TensorDataset(x[:n_test], y[:n_test])
    # the shuffle is seeded per partition and round, so a node's batches do not depend on
    # which process or thread ran the ClientApp before
    generator = torch.Generator().manual_seed(seed * 1000 + partition_id * 100 + server_round)
    trainloader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    return trainloader, DataLoader(test, batch_size=256)


def train(net: Net, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """Train the model on the training set; the mean loss of the last epoch."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        running_loss = 0.0
        for x, y in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / len(trainloader)


def test(net: Net, testloader: DataLoader) -> tuple[float, float]:
    """Loss and accuracy of the model on the test set."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in testloader:
            outputs = net(x)
            loss += criterion(outputs, y).item()
            correct += (outputs.argmax(1) == y).sum().item()
    total = len(testloader.dataset)
    return loss / total, correct / total

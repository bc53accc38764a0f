"""sparse_quickstart: model, synthetic data, train and test (nothing sparse here).

The data is made up so that the app runs offline: each class ``c`` of
``NUM_CLASSES`` is a bright Gaussian blob centred at its own spot of a 12x12
grey image, jittered by a pixel or so and drowned in pixel noise. Everything
is drawn from a ``torch.Generator`` seeded by ``(seed, partition_id)``, so a
partition is the same on every run and every machine.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 10
IMAGE_SIZE = 12
TRAIN_EXAMPLES = 256  # per partition
TEST_EXAMPLES = 64  # per partition (federated evaluation)
CENTRAL_TEST_EXAMPLES = 500  # the server's held-out set
_CENTRAL_PARTITION = 1_000_000  # a stream of draws no client partition uses


class Net(nn.Module):
    """A small CNN with BatchNorm: 1x12x12 -> 10 classes, 2.8 k parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(16 * 3 * 3, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # 8 x 6 x 6
        x = self.pool(F.relu(self.bn2(self.conv2(x))))  # 16 x 3 x 3
        return self.fc(x.flatten(1))


def class_centres() -> torch.Tensor:
    """Blob centre (row, col) of each class: a fixed 4 x 3 grid of spots (10 used)."""
    spots = [(r, c) for r in (2.0, 5.0, 8.0, 10.0) for c in (2.5, 6.0, 9.5)]
    return torch.tensor(spots[:NUM_CLASSES])


def make_blobs(n: int, seed: int, partition_id: int, noise: float = 0.6):
    """``n`` images (n, 1, 12, 12) and labels (n,), deterministic in (seed, partition_id)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(partition_id))
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    centres = class_centres()[labels] + 0.7 * torch.randn(n, 2, generator=g)
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    rows = (grid.view(1, -1, 1) - centres[:, 0].view(-1, 1, 1)) ** 2
    cols = (grid.view(1, 1, -1) - centres[:, 1].view(-1, 1, 1)) ** 2
    images = torch.exp(-(rows + cols) / (2 * 1.5**2))
    images = images + noise * torch.randn(n, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return images.unsqueeze(1), labels


def load_data(partition_id: int, num_partitions: int, batch_size: int, seed: int = 0):
    """This partition's train and test loaders (``num_partitions`` only names the split)."""
    x, y = make_blobs(TRAIN_EXAMPLES + TEST_EXAMPLES, seed, partition_id)
    train = TensorDataset(x[:TRAIN_EXAMPLES], y[:TRAIN_EXAMPLES])
    test = TensorDataset(x[TRAIN_EXAMPLES:], y[TRAIN_EXAMPLES:])
    shuffle = torch.Generator().manual_seed(int(seed) + int(partition_id))
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffle),
        DataLoader(test, batch_size=batch_size),
    )


def load_centralized_dataset(seed: int = 0, batch_size: int = 128):
    """The server's held-out test set (drawn from a stream no client uses)."""
    x, y = make_blobs(CENTRAL_TEST_EXAMPLES, seed, _CENTRAL_PARTITION)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set; returns the mean training loss."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set; returns (loss, accuracy)."""
    net.to(device)
    net.eval()
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)

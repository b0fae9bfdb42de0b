"""The native reference model of every benchmark and of ``python -m fusedgrad demo``."""
from torch import nn


class Net(nn.Module):
    """The reference model: Linear → Sigmoid → Linear in plain PyTorch."""

    def __init__(self, n_feature, n_hidden, n_output):
        super().__init__()
        self.linear1 = nn.Linear(n_feature, n_hidden)
        self.sigmoid = nn.Sigmoid()
        self.linear2 = nn.Linear(n_hidden, n_output)

    def forward(self, x):
        return self.linear2(self.sigmoid(self.linear1(x)))

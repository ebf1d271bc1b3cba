"""Quick start: SGD vs SAM vs mSAM on scikit-learn's digits (runs in seconds on a CPU).

    python examples/quickstart.py
"""

import torch

import msam
from msam.data import iterate_batches, load_dataset


def run(method: str, m: int = 1, rho: float = 0.05, epochs: int = 15, seed: int = 0) -> float:
    torch.manual_seed(seed)
    data = load_dataset("digits", seed=seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    kwargs = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    if method == "sgd":
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.0, **kwargs)
    else:
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=rho, micro_batches=m, **kwargs)

    def loss_fn(batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    for epoch in range(epochs):
        for x, y in iterate_batches(data.train, 64, shuffle=True, seed=seed, epoch=epoch):
            opt.step(loss_fn, (x, y))
    with torch.no_grad():
        pred = model(data.test.x).argmax(1)
    return float((pred == data.test.y).float().mean())


if __name__ == "__main__":
    for name, m in [("sgd", 1), ("sam", 1), ("msam", 4)]:
        print(f"{name:5s} m={m}: test accuracy {run(name, m):.4f}")

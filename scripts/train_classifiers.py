"""Train the packaged feature classifiers (digits, Fashion-MNIST) on CPU and save them.

Usage: python scripts/train_classifiers.py [--datasets digits fashion_mnist] [--seed 0]

Writes ``<out>/<name>_classifier.safetensors`` + ``.json`` (architecture, held-out accuracy,
seed, date). The test split is used once, after training, to report accuracy; no choice
(epochs, learning rate) is made by looking at it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tread.data import load_dataset
from tread.errors import TreadError
from tread.eval.classifiers import SmallCNN, build_classifier, save_classifier, weights_dir


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters for one dataset."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    shift: int  # random translation of up to ±shift pixels
    hflip: bool  # random horizontal flips (fine for clothes, wrong for digits)


RECIPES = {
    "digits": Recipe(epochs=40, batch_size=64, lr=3e-3, weight_decay=1e-4, shift=1, hflip=False),
    "fashion_mnist": Recipe(
        epochs=6, batch_size=128, lr=3e-3, weight_decay=1e-4, shift=2, hflip=True
    ),
}


def augment(x: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """Random shifts (padding with the -1 background) and optional flips. x: (B, C, H, W)."""
    b, _, h, w = x.shape
    if recipe.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    p = recipe.shift
    if p:
        padded = F.pad(x, (p, p, p, p), value=-1.0)  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    return x


@torch.no_grad()
def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode, in batches."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], 1000):
        logits = model(images[start : start + 1000])["logits"]
        correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / images.shape[0]


def train_one(name: str, seed: int, out: str) -> float:
    """Train, evaluate on the test split, save; returns the held-out accuracy."""
    recipe = RECIPES[name]
    train = load_dataset(name, split="train")
    test = load_dataset(name, split="test")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_classifier(name)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = train.images.shape[0]
    steps = recipe.epochs * ((n + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            x = augment(train.images[idx], recipe, gen)
            loss = F.cross_entropy(model(x)["logits"], train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.shape[0]
        print(f"{name} epoch {epoch + 1}/{recipe.epochs} loss {total / n:.4f}", flush=True)
    train_seconds = time.time() - t0
    test_acc = accuracy(model, test.images, test.labels)
    train_acc = accuracy(model, train.images, train.labels)
    machine = f"{os.cpu_count()}-core CPU, " + ("GPU" if torch.cuda.is_available() else "no GPU")
    meta = {
        "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4),
        "train_size": n,
        "test_size": int(test.images.shape[0]),
        "seed": seed,
        "recipe": recipe.__dict__,
        "train_seconds": round(train_seconds, 1),
        "machine": machine,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    path = save_classifier(model, out, meta)
    size_kb = path.stat().st_size / 1024
    print(
        f"{name}: held-out (test) accuracy {test_acc:.4f}, train accuracy {train_acc:.4f}, "
        f"{train_seconds:.0f} s on {machine}, {size_kb:.0f} KiB -> {path}",
        flush=True,
    )
    return test_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(weights_dir()), help="output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.datasets:
        try:
            train_one(name, args.seed, args.out)
        except TreadError as err:  # e.g. Fashion-MNIST files not installed
            print(f"{name}: skipped ({err})")


if __name__ == "__main__":
    main()

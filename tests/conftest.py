"""Shared fixtures: tiny models that run in milliseconds on a CPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import tread

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads
# fighting another process make small matmuls ~100x slower. One thread keeps the suite fast.
torch.set_num_threads(1)


# Config overrides for a tiny routed DiT on digits (3 blocks, width 32, 16 tokens): the model
# part of every test that trains through the config path.
TINY_MODEL = [
    "model.depth=3",
    "model.width=32",
    "model.heads=2",
    "model.patch_size=2",
    "model.routes=[{start: 1, end: 1, ratio: 0.5}]",
]

# A tiny training run on top of ``digits_tread``: the model above, batch 16, a row per step,
# no sample grids, no time budget.
TINY_RUN = [
    *TINY_MODEL,
    "train.batch_size=16",
    "train.log_every=1",
    "train.sample_every=0",
    "train.max_minutes=null",
    "sample.grid_size=2",
    "sample.steps=2",
    "ema.decay=0.99",
]

# Overrides for the latent-data tests: a 2-step run of a tiny DiT (depth 2, width 32, patch 1).
TINY_LATENT_MODEL = [
    "model.depth=2",
    "model.width=32",
    "model.heads=2",
    "model.patch_size=1",
    "model.routes=[{start: 0, end: 0, ratio: 0.5}]",
    "train.steps=2",
    "train.batch_size=4",
    "train.sample_every=0",
    "train.max_minutes=null",
]


def tiny_dit(**overrides):
    """A 4-block, width-32 DiT on 8x8x1 inputs with 10 classes (16 tokens at patch 2)."""
    options = dict(input_size=8, in_channels=1, num_classes=10, depth=4, width=32, heads=2)
    options.update(overrides)
    torch.manual_seed(0)
    model = tread.build_model("DiT-S/2", **options)
    # DiT zero-initialises adaLN and the output layer; perturb so every path carries signal.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture
def tiny_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.tensor([0, 4, 10])  # 10 = null label
    return x, t, y


def free_port() -> int:
    """A free TCP port on localhost for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_train_worker(rank: int, config, port: int) -> None:
    """``mp.spawn`` target: one rank of a 2-process gloo training run of ``config``."""
    from tread.train import DistInfo, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(config, dist=DistInfo(rank=rank, world_size=2), progress=False)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL folder, made offline: 4 latent channels, 8x
    downsampling (32x32 images <-> 4x4 latents)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path

"""Published DiT/SiT checkpoints -> tread's DiT: outputs equal an independent reference forward.

The checkpoints here are synthetic: random tensors in the official facebookresearch/DiT key
layout for a tiny DiT (depth 2, width 64, 2 heads, patch 2, 8x8x4 inputs, 10 classes, learned
sigma). ``reference_forward`` is a functional DiT forward written from that raw dict alone, so a
wrong key map, chunk order or reshape in the conversion shows up as different outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tread
from tread.cli import main
from tread.errors import CheckpointError, ConfigError
from tread.pretrained import convert_checkpoint, load_pretrained

DEPTH, WIDTH, HEADS, PATCH, SIZE, CHANNELS, CLASSES = 2, 64, 2, 2, 8, 4, 10
TINY = {"depth": DEPTH, "width": WIDTH, "heads": HEADS}  # overrides of the DiT-S/2 entry
TINY_ARGS = ["--arch", f"depth={DEPTH}", "--arch", f"width={WIDTH}", "--arch", f"heads={HEADS}"]


def official_pos_embed(width: int, grid: int) -> torch.Tensor:
    """The official fixed 2-D sin-cos (MAE recipe, numpy float64): (1, grid*grid, width).

    The first half of the channels encodes the column (w), the second the row (h); each half is
    [sin | cos] over width/4 frequencies 1 / 10000^(k / (width/4)).
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    col, row = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)  # (grid*grid, quarter)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(col), encode(row)], axis=1)  # (grid*grid, width)
    return torch.from_numpy(table).float().unsqueeze(0)


def official_state(seed: int, *, learn_sigma: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under the official key names, with the official fixed pos_embed."""
    g = torch.Generator().manual_seed(seed)
    D, p, C = WIDTH, PATCH, CHANNELS
    out_channels = 2 * C if learn_sigma else C
    shapes = {
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, D),
    }
    for i in range(DEPTH):
        shapes.update(
            {
                f"blocks.{i}.attn.qkv.weight": (3 * D, D),
                f"blocks.{i}.attn.qkv.bias": (3 * D,),
                f"blocks.{i}.attn.proj.weight": (D, D),
                f"blocks.{i}.attn.proj.bias": (D,),
                f"blocks.{i}.mlp.fc1.weight": (4 * D, D),
                f"blocks.{i}.mlp.fc1.bias": (4 * D,),
                f"blocks.{i}.mlp.fc2.weight": (D, 4 * D),
                f"blocks.{i}.mlp.fc2.bias": (D,),
                f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
                f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
            }
        )
    shapes.update(
        {
            "final_layer.linear.weight": (p * p * out_channels, D),
            "final_layer.linear.bias": (p * p * out_channels,),
            "final_layer.adaLN_modulation.1.weight": (2 * D, D),
            "final_layer.adaLN_modulation.1.bias": (2 * D,),
        }
    )
    # Large enough that every modulation, gate and bias moves the output visibly.
    state = {key: 0.15 * torch.randn(shape, generator=g) for key, shape in shapes.items()}
    state["pos_embed"] = official_pos_embed(D, SIZE // p)
    return state


def reference_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int
) -> torch.Tensor:
    """Official DiT forward, written functionally from the raw official state dict."""

    def linear(v: torch.Tensor, key: str) -> torch.Tensor:
        return F.linear(v, sd[f"{key}.weight"], sd[f"{key}.bias"])

    def norm_mod(v: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(v, (v.shape[-1],), eps=1e-6)  # no affine
        return normed * (1 + scale[:, None]) + shift[:, None]

    weight = sd["x_embedder.proj.weight"]
    D, p = weight.shape[0], weight.shape[-1]
    h = F.conv2d(x, weight, sd["x_embedder.proj.bias"], stride=p)  # (B, D, H/p, W/p)
    tokens = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, N, D)
    B, N, _ = tokens.shape

    half = 128  # 256 frequency channels: cos first, then sin; max period 10000
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    head_dim = D // heads
    for i in range(depth):
        b = f"blocks.{i}"
        mods = linear(F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        qkv = linear(norm_mod(tokens, shift_msa, scale_msa), f"{b}.attn.qkv")
        qkv = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
        weights = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(B, N, D)
        tokens = tokens + gate_msa[:, None] * linear(attended, f"{b}.attn.proj")
        hidden = F.gelu(
            linear(norm_mod(tokens, shift_mlp, scale_mlp), f"{b}.mlp.fc1"), approximate="tanh"
        )
        tokens = tokens + gate_mlp[:, None] * linear(hidden, f"{b}.mlp.fc2")

    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = linear(norm_mod(tokens, shift, scale), "final_layer.linear")  # (B, N, p*p*C_out)
    c_out, grid = out.shape[-1] // (p * p), math.isqrt(N)
    out = out.reshape(B, grid, grid, p, p, c_out)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(B, c_out, grid * p, grid * p)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.tensor([0.0, 17.5, 999.0])  # DDPM timesteps, one fractional
    y = torch.tensor([0, 9, CLASSES])  # the last is the null (guidance) label
    return x, t, y


def write(tmp_path, kind: str, ema: dict[str, torch.Tensor]):
    """Save ``ema`` as the official releases do (``raw``), as a training checkpoint
    (``train``: model, ema, opt, args), or as a safetensors file in the official layout."""
    if kind == "raw":
        path = tmp_path / "DiT-tiny.pt"
        torch.save(ema, path)
    elif kind == "train":
        path = tmp_path / "0400000.pt"
        checkpoint = {
            "model": official_state(99),  # not the EMA: loading it would give other outputs
            "ema": ema,
            "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="DiT-XL/2", image_size=256, global_batch_size=256),
        }
        torch.save(checkpoint, path)
    else:
        path = tmp_path / "official.safetensors"
        save_file(ema, str(path))
    return path


@pytest.mark.parametrize("kind", ["raw", "train", "safetensors"])
@pytest.mark.parametrize("name", ["DiT-S/2", "SiT-S/2"])
def test_converted_model_matches_official_forward(tmp_path, inputs, kind, name):
    sd = official_state(0)
    model = load_pretrained(write(tmp_path, kind, sd), name, **TINY)
    x, t, y = inputs
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (3, 2 * CHANNELS, SIZE, SIZE)  # learned sigma kept
    torch.testing.assert_close(out, reference_forward(sd, x, t, y, HEADS), rtol=1e-4, atol=1e-5)
    assert not model.training
    config = model.config
    assert (config.input_size, config.in_channels, config.num_classes) == (SIZE, CHANNELS, CLASSES)
    assert config.learn_sigma


def test_without_learned_sigma_the_output_has_c_channels(tmp_path, inputs):
    sd = official_state(1, learn_sigma=False)
    model = load_pretrained(write(tmp_path, "raw", sd), "DiT-S/2", **TINY)
    x, t, y = inputs
    with torch.no_grad():
        out = model(x, t, y)
    assert not model.config.learn_sigma and out.shape == x.shape
    torch.testing.assert_close(out, reference_forward(sd, x, t, y, HEADS), rtol=1e-4, atol=1e-5)


def test_build_options_pass_through_and_input_size_may_change(tmp_path, inputs):
    path = write(tmp_path, "raw", official_state(0))
    route = tread.Route(0, 1, 0.5)
    model = load_pretrained(path, "DiT-S/2", **TINY, routes=[route], input_size=16)
    assert model.routes == (route,)
    x = torch.randn(2, CHANNELS, 16, 16)  # positions are fixed sin-cos: any grid works
    assert model(x, torch.tensor([3.0, 4.0]), torch.tensor([1, 2])).shape == (2, 8, 16, 16)


def test_wrong_name_names_the_tensor_and_both_shapes(tmp_path):
    path = write(tmp_path, "raw", official_state(0))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, "DiT-S/2")  # width 384, not 64
    assert "x_embedder.proj.weight has shape (64, 4, 2, 2), DiT-S/2 expects (384, 4, 2, 2)" in str(
        err.value
    )
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, "DiT-S/2", **TINY, mlp_ratio=2.0)
    message = str(err.value)
    assert "blocks.0.mlp.fc1.weight has shape (256, 64), DiT-S/2 expects (128, 64)" in message
    assert "DiT-tiny.pt" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="DiT-tiny.pt has 2 blocks, DiT-S/2 has 3"):
        load_pretrained(path, "DiT-S/2", **{**TINY, "depth": 3})


def test_missing_and_unknown_keys_are_named(tmp_path):
    sd = official_state(0)
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"lacks 1 key\(s\) .*blocks\.1\.mlp\.fc2\.bias"):
        load_pretrained(write(tmp_path, "raw", sd), "DiT-S/2", **TINY)
    sd = official_state(0)
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(WIDTH // HEADS)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        load_pretrained(write(tmp_path, "raw", sd), "DiT-S/2", **TINY)


def test_pos_embed_must_be_the_fixed_sincos(tmp_path):
    sd = official_state(0)
    grid = SIZE // PATCH
    # Rows and columns in the other order: a plausible convention slip, refused by name.
    pos = sd["pos_embed"].reshape(grid, grid, WIDTH).transpose(0, 1).reshape(1, grid * grid, WIDTH)
    sd["pos_embed"] = pos.contiguous()
    with pytest.raises(CheckpointError, match=r"pos_embed is not the fixed 2-D sin-cos"):
        load_pretrained(write(tmp_path, "raw", sd), "DiT-S/2", **TINY)


class NotATensor:
    pass


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt is not a PyTorch checkpoint"):
        load_pretrained(text, "DiT-S/2", **TINY)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="broken.safetensors is not a safetensors file"):
        load_pretrained(bad, "DiT-S/2", **TINY)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="list.pt holds no state dict"):
        load_pretrained(listing, "DiT-S/2", **TINY)
    pickled = tmp_path / "pickled.pt"  # arbitrary objects are never unpickled
    torch.save({"ema": official_state(0), "extra": NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pt is not a PyTorch checkpoint"):
        load_pretrained(pickled, "DiT-S/2", **TINY)
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="other.pt is not a DiT/SiT state dict"):
        load_pretrained(other, "DiT-S/2", **TINY)
    with pytest.raises(CheckpointError, match="missing.pt not found"):
        load_pretrained(tmp_path / "missing.pt", "DiT-S/2", **TINY)


def test_non_dit_names_and_bad_overrides_are_refused(tmp_path):
    path = write(tmp_path, "raw", official_state(0))
    with pytest.raises(ConfigError, match="'Mamba-S/2' is not a DiT/SiT entry"):
        load_pretrained(path, "Mamba-S/2")
    with pytest.raises(ConfigError, match="unknown option"):
        load_pretrained(path, "DiT-S/2", **TINY, d_state=4)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_convert_cli_end_to_end(tmp_path, inputs, capsys):
    sd = official_state(0)
    src = write(tmp_path, "train", sd)
    out = tmp_path / "converted" / "dit_tiny.safetensors"
    argv = ["convert", str(src), str(out), "--model", "DiT-S/2", *TINY_ARGS, "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "learn_sigma true" in printed
    assert "input 4x8x8 -> output 8x8x8" in printed
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata == {
        "tread_model": "DiT-S/2",
        "learn_sigma": "true",
        "input_size": "8",
        "source": "0400000.pt",
    }
    # Exactly our model's state dict, so a strict load (train.init_from) takes it.
    reference = tread.build_model(
        "DiT-S/2",
        **TINY,
        input_size=SIZE,
        in_channels=CHANNELS,
        num_classes=CLASSES,
        learn_sigma=True,
    )
    assert keys == set(reference.state_dict())
    model = load_pretrained(out, "DiT-S/2", **TINY)
    x, t, y = inputs
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, y), reference_forward(sd, x, t, y, HEADS), rtol=1e-4, atol=1e-5
        )

    before = digest(out)
    assert main(argv) == 2  # an existing OUT is refused, and left as it was
    err = capsys.readouterr().err
    assert "exists" in err and str(out) in err and err.count("\n") == 1
    assert digest(out) == before
    assert main([*argv, "--overwrite"]) == 0
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_convert_refuses_a_wrong_model_in_one_line(tmp_path, capsys):
    src = write(tmp_path, "raw", official_state(0))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--model", "DiT-B/2", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "x_embedder.proj.weight has shape (64, 4, 2, 2), DiT-B/2 expects (768, 4, 2, 2)" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        convert_checkpoint(src, tmp_path / "out.pt", "DiT-S/2", **TINY)


def test_a_tread_layout_file_needs_its_input_size(tmp_path):
    model = load_pretrained(write(tmp_path, "raw", official_state(0)), "DiT-S/2", **TINY)
    bare = tmp_path / "bare.safetensors"  # our key layout, but no header metadata
    save_file(model.state_dict(), str(bare))
    with pytest.raises(CheckpointError, match="bare.safetensors does not record its input_size"):
        load_pretrained(bare, "DiT-S/2", **TINY)
    again = load_pretrained(bare, "DiT-S/2", **TINY, input_size=SIZE)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_converted_official_checkpoint_starts_a_training_run(tmp_path, capsys):
    """convert -> train.init_from: the run starts from the official weights (model and EMA)."""
    torch.save(official_state(3), tmp_path / "official.pt")
    converted = tmp_path / "dit.safetensors"
    assert (
        main(
            [
                "convert",
                str(tmp_path / "official.pt"),
                str(converted),
                "--model",
                "DiT-S/2",
                *TINY_ARGS,
            ]
        )
        == 0
    )
    latents = torch.randn(32, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "lat.npz", latents=latents.numpy(), labels=np.arange(32) % CLASSES)
    run_dir = tmp_path / "run"
    args = [
        "train",
        "digits_dit",
        "data.name=latents",
        f"data.path={tmp_path / 'lat.npz'}",
        f"model.depth={DEPTH}",
        f"model.width={WIDTH}",
        f"model.heads={HEADS}",
        f"model.patch_size={PATCH}",
        "model.learn_sigma=true",
        f"train.init_from={converted}",
        f"train.run_dir={run_dir}",
        "train.steps=1",
        "train.batch_size=8",
        "train.sample_every=0",
        "eval.every=0",
        "optim.lr=1e-12",
    ]
    assert main(args) == 0
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    source = load_file(converted)
    for file in ("model.safetensors", "ema.safetensors"):
        trained = load_file(checkpoint / file)
        assert trained.keys() == source.keys()
        for key in source:  # one step at lr 1e-12 leaves the weights where they started
            torch.testing.assert_close(trained[key], source[key], atol=1e-6, rtol=0, msg=key)
    # A model that does not learn sigma does not fit the file: refused in one line.
    capsys.readouterr()
    plain = [a for a in args if not a.startswith(("model.learn_sigma", "train.run_dir"))]
    assert main([*plain, f"train.run_dir={tmp_path / 'other'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.init_from=" in err and "final_layer.linear.weight has shape" in err
    assert not (tmp_path / "other").exists()

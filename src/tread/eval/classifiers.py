"""Small CNN classifiers for the offline datasets, used as feature nets for FD, accuracy and IS.

FD computed with these nets is *not* FID: the features come from a 128-d penultimate layer of a
net trained on the dataset itself, so the numbers are only comparable with other FD numbers from
the same packaged weights (the JSON beside each weights file records which).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tread.errors import ConfigError, DataError
from tread.eval.features import FeatureOutput, center_crop_to

ClassifierName = Literal["digits", "fashion_mnist"]


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of a :class:`SmallCNN`.

    Attributes:
        in_channels: image channels.
        image_size: square input side the net is trained on (larger inputs are centre-cropped).
        widths: output channels of each 3×3 conv (conv → BN → ReLU).
        pool_after: whether a 2×2 max-pool follows each conv.
        hidden: width of the penultimate layer, the "pool" feature used for FD.
        num_classes: number of classes.
        dropout: dropout before the final linear layer (training only).
    """

    in_channels: int = 1
    image_size: int = 28
    widths: tuple[int, ...] = (32, 64, 128)
    pool_after: tuple[bool, ...] = (True, True, True)
    hidden: int = 128
    num_classes: int = 10
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.pool_after) or not self.widths:
            raise ConfigError(f"widths {self.widths} and pool_after {self.pool_after} must match")

    @property
    def final_size(self) -> int:
        """Spatial side after all pools (floor division, as max-pool does)."""
        side = self.image_size
        for pooled in self.pool_after:
            side = side // 2 if pooled else side
        return side


CLASSIFIER_CONFIGS: dict[str, ClassifierConfig] = {
    # 8×8 → (conv) 8 → (conv, pool) 4 → (conv, pool) 2: 128·2·2 = 512 flattened features.
    "digits": ClassifierConfig(image_size=8, pool_after=(False, True, True), dropout=0.2),
    # 28×28 → 14 → 7 → 3: 96·3·3 = 864 flattened features (keeps the file under 1 MB).
    "fashion_mnist": ClassifierConfig(image_size=28, widths=(32, 64, 96)),
}


class SmallCNN(nn.Module):
    """Conv stack + MLP head; implements the :class:`~tread.eval.features.FeatureNet` protocol."""

    def __init__(self, config: ClassifierConfig, name: str = "small_cnn") -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.input_size = (config.in_channels, config.image_size, config.image_size)
        layers: list[nn.Module] = []
        in_ch = config.in_channels
        for width, pooled in zip(config.widths, config.pool_after, strict=True):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU(inplace=True))
            if pooled:
                layers.append(nn.MaxPool2d(2))
            in_ch = width
        self.features = nn.Sequential(*layers)
        flat = in_ch * config.final_size**2
        self.fc_hidden = nn.Linear(flat, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.fc_out = nn.Linear(config.hidden, config.num_classes)

    def forward(self, images: torch.Tensor) -> FeatureOutput:
        """Classify images.

        Args:
            images: (B, C, H, W) in [-1, 1]; H, W = image_size or larger with even margins
                (e.g. 32×32 padded Fashion-MNIST), which is centre-cropped.

        Returns:
            pool (B, hidden) penultimate ReLU features, logits (B, num_classes), spatial None.
        """
        size = self.config.image_size
        x = center_crop_to(images, (size, size), self.name)
        if x.shape[1] != self.config.in_channels:
            raise DataError(
                f"{self.name}: expects {self.config.in_channels} channel(s), got {x.shape[1]}"
            )
        h = self.features(x).flatten(1)  # (B, C', s, s) -> (B, C'·s·s)
        pool = torch.relu(self.fc_hidden(h))  # (B, hidden)
        logits = self.fc_out(self.dropout(pool))  # (B, num_classes)
        return FeatureOutput(pool=pool, logits=logits, spatial=None)


def build_classifier(name: str) -> SmallCNN:
    """Build an untrained classifier for a dataset.

    Args:
        name: "digits" or "fashion_mnist".

    Returns:
        A randomly initialised :class:`SmallCNN` in train mode.
    """
    if name not in CLASSIFIER_CONFIGS:
        raise ConfigError(f"unknown classifier {name!r}; choose from {get_args(ClassifierName)}")
    return SmallCNN(CLASSIFIER_CONFIGS[name], name=f"{name}_classifier")


def weights_dir() -> Path:
    """Folder holding the packaged classifier weights (``tread/eval/weights``)."""
    return Path(str(resources.files("tread.eval").joinpath("weights")))


def save_classifier(
    model: SmallCNN, directory: str | PathLike[str], meta: dict[str, Any] | None = None
) -> Path:
    """Save ``<dir>/<dataset>_classifier.safetensors`` plus a JSON with the architecture and meta.

    Args:
        model: a trained classifier (its name must be "<dataset>_classifier").
        directory: destination folder.
        meta: extra JSON-serialisable fields (accuracy, seed, date, ...).

    Returns:
        Path of the weights file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{model.name}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"name": model.name})
    path.chmod(0o644)  # safetensors writes 0600; packaged data should be world-readable
    info = {"name": model.name, "architecture": asdict(model.config), **(meta or {})}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
    return path


def classifier_info(name: str, directory: str | PathLike[str] | None = None) -> dict[str, Any]:
    """Read the JSON that describes a packaged classifier (architecture, accuracy, seed, date)."""
    build_classifier(name)  # validates the name
    path = Path(directory or weights_dir()) / f"{name}_classifier.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"classifier description unreadable: {path} ({err})") from err


def load_classifier(
    name: str, directory: str | PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> SmallCNN:
    """Load a packaged (or `directory`'s) trained classifier in eval mode with frozen weights.

    Args:
        name: "digits" or "fashion_mnist".
        directory: folder with ``<name>_classifier.safetensors`` and ``.json``; default: packaged.
        device: where to put the model.

    Returns:
        The classifier, a :class:`~tread.eval.features.FeatureNet`.
    """
    info = classifier_info(name, directory)
    try:
        config = ClassifierConfig(**_field_tuples(info["architecture"]))
    except (KeyError, TypeError) as err:
        raise DataError(f"{name}_classifier.json: bad 'architecture' entry ({err})") from err
    model = SmallCNN(config, name=f"{name}_classifier")
    path = Path(directory or weights_dir()) / f"{name}_classifier.safetensors"
    try:
        state = load_file(str(path))
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"classifier weights unreadable: {path} ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not match the architecture in its JSON") from err
    model.eval().requires_grad_(False)
    return model.to(device)


def _field_tuples(arch: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; turn them back so the frozen config stays hashable."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}


__all__ = [
    "CLASSIFIER_CONFIGS",
    "ClassifierConfig",
    "ClassifierName",
    "SmallCNN",
    "build_classifier",
    "classifier_info",
    "load_classifier",
    "save_classifier",
    "weights_dir",
]

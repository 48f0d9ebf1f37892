"""Pieces every subcommand shares: rank layout from torchrun, threads, devices, argument types.

This package is the only place that reads the environment (torchrun's RANK / WORLD_SIZE /
LOCAL_RANK, OMP_NUM_THREADS, TREAD_VAE) and sets process-wide torch flags.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from ..train.dist import DistInfo


def dist_info() -> DistInfo:
    """This process's place in a torchrun job (a single process without torchrun)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--count 0`` is refused, not silently replaced)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval: float = 0.01) -> int:
    """Cores other processes keep busy right now: the fewest runnable tasks over a few quick
    looks at ``/proc/loadavg`` (field 4, ``running/total``), minus this process.

    The minimum ignores short blips and keeps competitors that are always runnable; unlike the
    load average it does not lag behind by a minute. Off Linux: the 1-minute load average.
    """
    counts = []
    for _ in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            counts.append(int(running) - 1)
        except (OSError, IndexError, ValueError):
            break
        time.sleep(interval)
    if counts:
        return max(0, min(counts))
    try:
        return round(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0


def auto_threads() -> int:
    """A thread count that does not collapse when other processes share the CPU.

    OpenMP threads spin while they wait for each other; when another process holds a core, a
    team as large as the machine stalls on it (measured on a 2-core VM: ``tread sample --count
    1`` took 23 s with 2 threads and 1.9 s with 1). So ``auto`` takes the cores this process may
    use minus the cores other processes keep busy (:func:`busy_cores`), at least 1. An explicit
    ``OMP_NUM_THREADS`` wins.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = _available_cores()
    return max(1, min(cores, cores - busy_cores()))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None = :func:`auto_threads`); returns the count."""
    count = threads if threads else auto_threads()
    torch.set_num_threads(count)
    return count


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a device; CUDA ranks get ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: an unknown device, or CUDA asked for where there is none.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":  # the names of config.TrainDevice, plus cuda:N
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ConfigError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available on this machine")
    device = torch.device("cuda", int(index) if index else local_rank)
    if device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: CUDA device {device.index} does not exist "
            f"({torch.cuda.device_count()} visible)"
        )
    torch.cuda.set_device(device)
    return device


def add_runtime_options(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """``--threads`` (every command) and ``--device`` (commands that run a model)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: auto = free cores, at least 1; see README)",
    )
    if device:
        parser.add_argument(
            "--device",
            default="auto",
            help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)",
        )


def load_run_config(args: argparse.Namespace):
    """The config of ``tread train`` / ``compare``: preset + overrides, ``--threads`` as the
    ``train.num_threads`` override (so it is validated and saved like any other key)."""
    from ..config import load_config, split_config_args

    preset, overrides = split_config_args(args.config)
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    return load_config(preset, overrides)


def vae_path(args: argparse.Namespace) -> str | None:
    """``--vae``, else the TREAD_VAE environment variable."""
    return getattr(args, "vae", None) or os.environ.get("TREAD_VAE") or None


def add_vae_option(parser: argparse.ArgumentParser, what: str = "decode latent models") -> None:
    parser.add_argument(
        "--vae",
        default=None,
        help=f"local diffusers AutoencoderKL folder to {what} (default: $TREAD_VAE)",
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in ``--help`` (skips options whose default is None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

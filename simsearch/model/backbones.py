"""The backbone registry: a model name resolves to (network, width, pooling, preprocessing, stage groups).

Two families cover every network a researcher reaches for:
- `model.name=<torchvision name>` (`resnet50`, `convnext_tiny`, `vit_b_16`...): `torchvision.models.get_model`,
  preprocessing from the default weights' `transforms()`;
- `model.name=timm/<timm name>` (`timm/vit_small_patch16_224`, `timm/tf_efficientnet_lite0`...):
  `timm.create_model`, preprocessing from the model's `pretrained_cfg`.

Adding a family is one `@register_family` function; adding a network of a family is nothing (or one YAML
in configs/model/ to give it a short name).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from simsearch.errors import SimsearchError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Containers whose children are a network's stages/blocks, tried in order; `finetune.unfreeze=N` trains the last N.
STAGE_CONTAINERS = (("layer1", "layer2", "layer3", "layer4"), "blocks", "stages", "encoder.layers", "layers", "features")


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's inputs are prepared: square resize to `image_size` px, then (x/255 - mean) / std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # bilinear | bicubic


@dataclass(frozen=True)
class BackboneSpec:
    """What rebuilds a backbone from nothing else: recorded in manifests and fine-tuned checkpoints."""

    name: str  # as the user wrote it: resnet50, timm/vit_small_patch16_224
    family: str  # torchvision | timm
    weights: str  # imagenet | imagenet_v1 | a weights enum name | random | a state-dict path
    preprocessing: Preprocessing

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "preprocessing": {**asdict(self.preprocessing),
                                                  "mean": list(self.preprocessing.mean), "std": list(self.preprocessing.std)}}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> BackboneSpec:
        p = spec["preprocessing"]
        preprocessing = Preprocessing(int(p["image_size"]), tuple(p["mean"]), tuple(p["std"]), str(p["interpolation"]))
        return cls(str(spec["name"]), str(spec["family"]), str(spec["weights"]), preprocessing)


@dataclass
class Backbone:
    """A built network: (B, 3, S, S) -> (B, width) pooled features, and the ImageNet classifier it came with."""

    network: nn.Module
    width: int
    pooling: str
    classifier: nn.Module | None  # the removed 1000-class head (None when the network had none)


@dataclass(frozen=True)
class Family:
    default_preprocessing: Callable[[str], Preprocessing]
    build: Callable[[str, int], tuple[nn.Module, str]]  # (arch, image_size) -> (network with its head, pooling)
    classifier_name: Callable[[nn.Module], str]  # the dotted name of the classification layer


FAMILIES: dict[str, Family] = {}


def register_family(prefix: str) -> Callable[[Callable[[], Family]], Callable[[], Family]]:
    """`@register_family("timm")`: names `timm/<arch>` resolve through the returned Family."""

    def register(make: Callable[[], Family]) -> Callable[[], Family]:
        FAMILIES[prefix] = make()
        return make

    return register


def split_name(name: str) -> tuple[str, str]:
    """`timm/vit_small_patch16_224` -> (timm, vit_small_patch16_224); a bare name is torchvision's."""
    prefix, sep, arch = name.partition("/")
    if not sep:
        return "torchvision", name
    if prefix not in FAMILIES or not arch:
        raise SimsearchError(f"model.name={name}: write a torchvision name (resnet50) or timm/<name> (timm/vit_small_patch16_224)")
    return prefix, arch


# ---------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision.models as models

    return models.list_models(module=models)


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


def _torchvision_preprocessing(arch: str) -> Preprocessing:
    transforms = torchvision_weights(arch).transforms()
    return Preprocessing(int(transforms.crop_size[0]), tuple(transforms.mean), tuple(transforms.std),
                         transforms.interpolation.value)


def _torchvision_build(arch: str, image_size: int) -> tuple[nn.Module, str]:
    from torchvision.models import get_model

    fixed_size = arch.startswith("vit_")  # ViTs learn one position embedding per patch of a fixed grid
    network = get_model(arch, weights=None, **({"image_size": image_size} if fixed_size else {}))
    return network, "class token" if fixed_size else "average"


def _last_linear(network: nn.Module) -> str:
    """The classification layer: the last nn.Linear (resnet `fc`, vit `heads.head`, convnext `classifier.2`)."""
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise SimsearchError(f"{type(network).__name__} has no linear classification layer to remove")
    return names[-1]


@register_family("torchvision")
def _torchvision() -> Family:
    return Family(_torchvision_preprocessing, _torchvision_build, _last_linear)


# ---------------------------------------------------------------- timm


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise SimsearchError("timm/ model names need the timm package: pip install 'timm>=1.0'") from None
    return timm


def _timm_preprocessing(arch: str) -> Preprocessing:
    config = _timm_pretrained_cfg(arch)
    return Preprocessing(int(config.input_size[-1]), tuple(config.mean), tuple(config.std), config.interpolation or "bicubic")


def _timm_pretrained_cfg(arch: str) -> Any:
    config = _timm().models.get_pretrained_cfg(arch, allow_unregistered=False)
    if config is None:
        raise SimsearchError(f"timm has no pretrained configuration for {arch}")
    return config


def _timm_build(arch: str, image_size: int) -> tuple[nn.Module, str]:
    timm = _timm()
    fixed_size = bool(getattr(_timm_pretrained_cfg(arch), "fixed_input_size", False))
    network = timm.create_model(arch, pretrained=False, **({"img_size": image_size} if fixed_size else {}))
    pool = getattr(network, "global_pool", "avg")
    return network, str(getattr(pool, "pool_type", pool) or "none")


def _timm_classifier(network: nn.Module) -> str:
    return str(network.pretrained_cfg.get("classifier", "head"))


@register_family("timm")
def _timm_family() -> Family:
    return Family(_timm_preprocessing, _timm_build, _timm_classifier)


# ---------------------------------------------------------------- resolution


def check_name(name: str) -> tuple[str, str]:
    """(family, arch) of a model name that exists, else one sentence with the nearest names."""
    family, arch = split_name(name)
    known = _torchvision_names() if family == "torchvision" else _timm().list_models()
    base = arch.partition(".")[0]  # timm pretrained tags: vit_small_patch14_dinov2.lvd142m
    if base not in known:
        near = difflib.get_close_matches(base, known, n=3)
        prefix = "" if family == "torchvision" else f"{family}/"
        hint = f" (did you mean {', '.join(prefix + n for n in near)}?)" if near else ""
        where = "torchvision.models.list_models()" if family == "torchvision" else "timm.list_models()"
        raise SimsearchError(f"unknown model.name={name}{hint}: any name of {where} works, timm's as timm/<name>")
    return family, arch


def default_preprocessing(name: str) -> Preprocessing:
    """The library's own preprocessing for `name`'s pretrained weights (size, mean, std, interpolation)."""
    family, arch = check_name(name)
    return FAMILIES[family].default_preprocessing(arch)


def build_network(spec: BackboneSpec, seed: int) -> tuple[nn.Module, str]:
    """The architecture with its classification layer, seeded: `random` weights are the same on every rank and run."""
    family, arch = check_name(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FAMILIES[family].build(arch, spec.preprocessing.image_size)


def remove_classifier(network: nn.Module, family: str, pooling: str) -> Backbone:
    """Replace the classification layer by identity: the network now returns its pooled features."""
    name = FAMILIES[family].classifier_name(network)
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    classifier = getattr(parent, child)
    if not isinstance(classifier, nn.Linear):
        raise SimsearchError(f"cannot find the classification layer of {type(network).__name__} ({name} is not linear)")
    setattr(parent, child, nn.Identity())
    return Backbone(network, int(classifier.in_features), pooling, classifier)


def stage_groups(network: nn.Module) -> list[list[nn.Module]]:
    """The network's trainable stages/blocks in order; modules after the last one (a final norm, a head
    convolution) belong to the last group, so `finetune.unfreeze=1` trains everything after stage N-1."""
    for container in STAGE_CONTAINERS:
        if isinstance(container, tuple):
            if all(hasattr(network, name) for name in container):
                groups = [[getattr(network, name)] for name in container]
                groups[-1] += _modules_after(network, container[-1].split("."))
                return groups
            continue
        try:
            stages = network.get_submodule(container)
        except AttributeError:
            continue
        children = list(stages.children())
        if len(children) > 1:
            groups = [[child] for child in children]
            groups[-1] += _modules_after(network, container.split("."))
            return groups
    raise SimsearchError(f"finetune.unfreeze: the stages of {type(network).__name__} are unknown "
                         f"(none of {', '.join(map(str, STAGE_CONTAINERS))}): add its container to STAGE_CONTAINERS")


def _modules_after(root: nn.Module, path: list[str]) -> list[nn.Module]:
    """Siblings that follow each module on `path` (e.g. encoder.ln after encoder.layers, norm after blocks)."""
    after: list[nn.Module] = []
    parent = root
    for name in path:
        names = [n for n, _ in parent.named_children()]
        after += [getattr(parent, n) for n in names[names.index(name) + 1:]]
        parent = getattr(parent, name)
    return after

"""The backbone registry: a model name resolves to (network, width, pooling, preprocessing, stage groups).

Each family owns its names, its networks and its pretrained weights:
- `model.name=<torchvision name>` (`resnet50`, `convnext_tiny`, `vit_b_16`...): `torchvision.models.get_model`,
  preprocessing from the default weights' `transforms()`;
- `model.name=timm/<timm name>` (`timm/vit_small_patch16_224`, `timm/tf_efficientnet_lite0`...):
  `timm.create_model`, preprocessing from the model's `pretrained_cfg`;
- `model.name=pixels`: the image itself, resized and flattened (the baseline every backbone must beat).

Adding a family is one `@register_family` function; adding a network of a family is nothing (or one YAML
in the model presets to give it a short name).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simsearch.errors import SimsearchError
from simsearch.model.weights import load_state_dict_file, timm_imagenet, torchvision_imagenet, torchvision_weights
from simsearch.registry import Registry

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

    name: str  # as the user wrote it: resnet50, timm/vit_small_patch16_224, pixels
    family: str  # torchvision | timm | pixels | a registered family
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


def _no_classifier(network: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class Family:
    """A source of backbones. It decides which architectures it has, how each is built and prepared, and
    where its pretrained weights come from; `model.weights=random` or a state-dict path work for any family."""

    names: Callable[[], Iterable[str]]  # the architectures it knows: checked, and suggested when misspelt
    preprocessing: Callable[[str], Preprocessing]  # an architecture's own input size, mean, std, interpolation
    build: Callable[[str, int], tuple[nn.Module, str]]  # (arch, image_size) -> (network, pooling), random weights
    # the dotted name of the classification layer to remove; None: the network already returns its features
    classifier_name: Callable[[nn.Module], str | None] = _no_classifier
    # (arch, weights, network) -> the state dict of a named pretrained weights (`imagenet`...); None: it has none
    pretrained: Callable[[str, str, nn.Module], dict[str, torch.Tensor]] | None = None
    default_arch: str | None = None  # what the family's name alone means (`model.name=pixels`)


FAMILIES: Registry[Family] = Registry("backbone family", "model.name family")


def register_family(prefix: str) -> Callable[[Callable[[], Family]], Callable[[], Family]]:
    """`@register_family("mylib")` on a function returning a Family: `model.name=mylib/<arch>` then builds
    through it (and `model.name=mylib` alone, when the family has a `default_arch`)."""

    def register(make: Callable[[], Family]) -> Callable[[], Family]:
        FAMILIES.add(prefix, make())
        return make

    return register


def split_name(name: str) -> tuple[str, str]:
    """`timm/vit_small_patch16_224` -> (timm, vit_small_patch16_224); `pixels` -> (pixels, its default
    architecture); any other bare name is torchvision's."""
    prefix, sep, arch = name.partition("/")
    if not sep:
        if name in FAMILIES and FAMILIES[name].default_arch is not None:
            return name, FAMILIES[name].default_arch
        return "torchvision", name
    if prefix not in FAMILIES or not arch:
        known = ", ".join(f"{family}/<name>" for family in FAMILIES if family != "torchvision")
        raise SimsearchError(f"model.name={name}: write a torchvision name (resnet50) or one of {known}")
    return prefix, arch


# ---------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision.models as models

    return models.list_models(module=models)


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
    return Family(_torchvision_names, _torchvision_preprocessing, _torchvision_build, _last_linear,
                  lambda arch, weights, network: torchvision_imagenet(arch, weights))


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
    return Family(lambda: _timm().list_models(), _timm_preprocessing, _timm_build, _timm_classifier,
                  lambda arch, weights, network: timm_imagenet(arch, network, weights))


# ---------------------------------------------------------------- raw pixels


@register_family("pixels")
def _pixels() -> Family:
    """The image itself as its vector: resized to model.image_size, flattened, L2-normalised. No weights:
    `model.weights` is ignored. The trivial baseline (raw-pixel k-NN) through the same commands as a network."""
    return Family(names=lambda: ["flat"], preprocessing=lambda arch: Preprocessing(28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear"),
                  build=lambda arch, image_size: (nn.Flatten(), "none"), pretrained=lambda arch, weights, network: {},
                  default_arch="flat")


# ---------------------------------------------------------------- resolution


def check_name(name: str) -> tuple[str, str]:
    """(family, arch) of a model name that exists, else one sentence with the nearest names."""
    family, arch = split_name(name)
    known = list(FAMILIES[family].names())
    base = arch.partition(".")[0]  # timm pretrained tags: vit_small_patch14_dinov2.lvd142m
    if base not in known:
        near = difflib.get_close_matches(base, known, n=3)
        prefix = "" if family == "torchvision" else f"{family}/"
        hint = f" (did you mean {', '.join(prefix + n for n in near)}?)" if near else ""
        raise SimsearchError(f"unknown model.name={name}{hint}: the {family} family has no '{base}'")
    return family, arch


def default_preprocessing(name: str) -> Preprocessing:
    """The family's own preprocessing for `name` (size, mean, std, interpolation)."""
    family, arch = check_name(name)
    return FAMILIES[family].preprocessing(arch)


def build_network(spec: BackboneSpec, seed: int) -> tuple[nn.Module, str]:
    """The architecture with its classification layer, seeded: `random` weights are the same on every rank and run."""
    family, arch = check_name(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FAMILIES[family].build(arch, spec.preprocessing.image_size)


def load_weights(network: nn.Module, family: str, arch: str, weights: str) -> None:
    """Load `weights` into `network` (which still has its classifier): `random` keeps the seeded
    initialisation, a path is a state dict (its classifier may differ), any other name is the family's."""
    if weights == "random":
        return
    classifier = FAMILIES[family].classifier_name(network)
    if looks_like_path(weights):
        state = load_state_dict_file(Path(weights).expanduser())
        strict_classifier = False  # fine-tuned elsewhere: another number of classes is fine
    elif FAMILIES[family].pretrained is None:
        raise SimsearchError(f"model.weights={weights}: the {family} family has no pretrained weights; "
                             "use model.weights=random or a state-dict path")
    else:
        state = FAMILIES[family].pretrained(arch, weights, network)
        strict_classifier = True
    state = {key.removeprefix("module."): value for key, value in state.items()}
    head = f"{classifier}." if classifier else None
    if head and not strict_classifier:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise SimsearchError(f"model.weights={weights} does not fit {arch}: {str(error).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if strict_classifier or not (head and k.startswith(head))]
    if missing or result.unexpected_keys:
        raise SimsearchError(f"model.weights={weights} is not a {family} {arch} state dict "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def looks_like_path(weights: str) -> bool:
    return "/" in weights or "." in weights or Path(weights).expanduser().exists()


def remove_classifier(network: nn.Module, family: str, pooling: str, image_size: int) -> Backbone:
    """Replace the classification layer by identity: the network now returns its pooled features. The
    width is the classifier's input; a network without one is measured on one blank image."""
    name = FAMILIES[family].classifier_name(network)
    if name is None:
        with torch.no_grad():
            width = int(network.eval()(torch.zeros(1, 3, image_size, image_size)).flatten(1).shape[1])
        return Backbone(network, width, pooling, None)
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

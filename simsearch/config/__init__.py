"""Typed configuration: the schema (`schema.py`), then `configs/default.yaml`, then one preset per group
(`data=`, `model=`, `trainer=`, ...), then an `experiment=` recipe, then `key=value` overrides: each later one
wins, so the command line always has the last word.

The schema holds every key with its default and the reason for it; the YAML files only choose. They live in one
folder, `configs/` at the top of a checkout; a wheel carries the same files as `simsearch/configs/`
(setup.py maps that folder into the package: no second copy). A misspelt key or a value of the wrong type
is a `SimsearchError` naming the key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simsearch.config.schema import (  # noqa: F401 - the schema is part of the config's API
    Config,
    DataConfig,
    EvalConfig,
    IndexConfig,
    ModelConfig,
    TrainerConfig,
)
from simsearch.errors import SimsearchError
from simsearch.files import write_text_atomically

# The folders of configs/ whose files hold one section's keys, merged in default.yaml's order; `experiment`
# chooses a file of configs/experiment/ (any section's keys, and presets of the groups).
GROUPS = ("run", "data", "model", "trainer", "index", "eval", "search", "finetune", "logger", "experiment")
EXPERIMENT = "experiment"
# Short spellings accepted on the command line, e.g. `simsearch search query=42`.
ALIASES = {"query": "search.query", "filter": "search.filter"}
# Taken exactly as typed, never parsed as YAML: `query=true` is a file named `true`, `query=-0` is not row 0.
VERBATIM = ("search.query", "run.dir", "data.root", "search.grid", "search.filter", "eval.filter", "data.metadata")
# The smallest value each number may take: below it a run would fail later, less clearly.
MINIMUMS = {
    "data.batch_size": 1, "data.num_workers": 0, "data.num_items": 1, "data.num_classes": 1, "data.native_size_px": 1,
    "model.image_size": 1, "trainer.num_nodes": 1, "index.train_size": 1, "index.batch_size": 1, "eval.query_chunk": 1,
    "search.k": 1, "serve.port": 0, "serve.max_k": 1, "serve.batch_size": 1, "serve.batch_wait_ms": 0,
    "serve.thumbnail_px": 1, "run.seed": 0,
}
# The largest: beyond them a value is a typo, and would fail later as a traceback (numpy's seed range,
# memory for image_size^2 pixels, int64 overflow) or hold a server open for ever.
MAXIMUMS = {
    "serve.port": 65535, "run.seed": 2**32 - 1, "data.num_items": 10**9, "data.num_classes": 10**6,
    "data.native_size_px": 4096, "data.batch_size": 65_536, "data.num_workers": 1024, "model.image_size": 4096,
    "trainer.num_nodes": 100_000,
    "serve.max_k": 10**6, "serve.batch_size": 4096, "serve.batch_wait_ms": 60_000, "serve.thumbnail_px": 4096,
    "serve.max_upload_mb": 100_000, "serve.upload_timeout_s": 86_400, "serve.header_timeout_s": 3600,
}
LARGEST_INT = 2**63 - 1  # any integer key: numpy's int64
# What Lightning's Trainer accepts (simsearch picks one when None); anything else would fail inside it
PRECISIONS = ("16-mixed", "bf16-mixed", "32-true", "64-true", "16-true", "bf16-true", "16", "32", "64", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PATH_KEYS = ("run.dir", "data.root", "search.query", "search.grid", "duplicates.output", "duplicates.image")
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4096  # Linux's limits (errno 36 past them)
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


PACKAGED = Path(__file__).resolve().parent.parent / "configs"  # simsearch/configs/: only inside an installed wheel
CHECKOUT = Path(__file__).resolve().parent.parent.parent / "configs"  # configs/ beside simsearch/ in a checkout


def config_dir() -> Path:
    """The configs folder: $SIMSEARCH_CONFIGS, else the copy inside an installed wheel, else the checkout's."""
    env = os.environ.get("SIMSEARCH_CONFIGS")
    for path in [Path(env)] if env else [PACKAGED, CHECKOUT]:
        if (path / "default.yaml").is_file():
            return path
    where = env or f"{PACKAGED} or {CHECKOUT}"
    raise SimsearchError(f"no default.yaml in {where}: set SIMSEARCH_CONFIGS to a configs folder, or reinstall simsearch")


def presets(group: str) -> list[str]:
    """The names a group can choose: its files in the configs folder."""
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def _explain(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or ""
    message = str(error).splitlines()[0]
    return f"config error at '{key}': {message}" if key else f"config error: {message}"


def _split_arguments(arguments: list[str]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Group choices, `key=value` overrides to parse, and verbatim overrides (see VERBATIM)."""
    choices: dict[str, str] = {}
    overrides: list[str] = []
    verbatim: dict[str, str] = {}
    for argument in arguments:
        key, sep, value = argument.partition("=")
        if not sep or not key:
            raise SimsearchError(f"cannot read argument '{argument}': write key=value, e.g. data.root=DIR")
        key = ALIASES.get(key, key)
        if key in GROUPS:
            choices[key] = value
        elif key in VERBATIM and value not in ("null", "~"):
            if key == "run.dir" and not value.strip():
                raise SimsearchError("run.dir= is empty: give the store's folder, e.g. run.dir=outputs/photos")
            verbatim[key] = value.replace("${", "\\${")  # escaped: never an interpolation
        else:
            overrides.append(f"{key}={value}")
    return choices, overrides, verbatim


def _lists_from_scalars(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """`eval.k=5` means `eval.k=[5]`: a scalar given for a list key becomes a list of one."""
    result = []
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            is_list = OmegaConf.is_list(OmegaConf.select(cfg, key, throw_on_missing=False))
        except OmegaConfBaseException:
            is_list = False
        result.append(f"{key}=[{value}]" if is_list and not value.strip().startswith("[") else override)
    return result


def _parse_overrides(overrides: list[str]) -> DictConfig:
    """`key=value` strings as a config, each parsed alone so a bad one is named in one sentence."""
    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except Exception as error:  # noqa: BLE001 - YAML and grammar errors come in many types
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SimsearchError(f"cannot read the override '{override[:200]}': {message}") from None
    return OmegaConf.from_dotlist(overrides)


def _nested(dotted: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml syntax errors come in many types
        raise SimsearchError(f"cannot read {path}: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise SimsearchError(f"{path} must hold a mapping of keys to values")
    return loaded


def _choices(config: DictConfig, path: Path) -> dict[str, str]:
    """A file's `defaults:` (group: preset), taken out of it; a group that is not one is refused."""
    chosen = OmegaConf.to_container(config.pop("defaults", OmegaConf.create({})))
    if not isinstance(chosen, dict):
        raise SimsearchError(f"defaults: in {path} must map each group to a preset, e.g. data: cifar10")
    known = [group for group in GROUPS if group != EXPERIMENT]  # an experiment chooses no other experiment
    for group in chosen:
        if group not in known:
            raise SimsearchError(f"unknown config group '{group}' in {path} (known: {', '.join(known)})")
    return {str(group): str(choice) for group, choice in chosen.items()}


def _preset_file(root: Path, group: str, choice: str) -> Path | None:
    """configs/<group>/<choice>.yaml; None for a registered dataset with no preset; else refused, naming the known."""
    path = root / group / f"{choice}.yaml"
    if path.is_file():
        return path
    if group == "data":  # a registered dataset needs no preset
        return None
    raise SimsearchError(f"unknown choice {group}={choice} (known: {', '.join(presets(group))})")


def _experiment(root: Path, name: str | None) -> tuple[DictConfig, dict[str, str]]:
    """configs/experiment/<name>.yaml: its keys (any section) and its preset choices."""
    path = _preset_file(root, EXPERIMENT, name) if name else None
    experiment = _load_yaml(path) if path else OmegaConf.create({})
    return experiment, _choices(experiment, path) if path else {}


def _keys(node: DictConfig, missing: bool, prefix: str = "") -> set[str]:
    """The dotted keys a file leaves `???` (missing=True) or sets; read without resolving an interpolation
    (a group file's `${data.name}` names a key of another section)."""
    keys: set[str] = set()
    for key in node:
        if OmegaConf.is_dict(node._get_node(key)):
            keys |= _keys(node._get_node(key), missing, f"{prefix}{key}.")
        elif OmegaConf.is_missing(node, key) == missing:
            keys.add(f"{prefix}{key}")
    return keys


def load_config(arguments: list[str] | None = None, allow_missing: bool = False) -> DictConfig:
    """Compose the schema, `default.yaml`, the chosen group files, the `experiment=` file and `key=value`
    overrides, each over the one before. A group chosen on the command line beats the experiment's choice,
    which beats default.yaml's. `allow_missing`: keys that must be given may stay `???` (`simsearch config`
    shows them so)."""
    root = config_dir()
    choices, overrides, verbatim = _split_arguments(list(arguments or []))
    defaults = _load_yaml(root / "default.yaml")
    experiment, experiment_choices = _experiment(root, choices.pop(EXPERIMENT, None))
    chosen = {**_choices(defaults, root / "default.yaml"), **experiment_choices, **choices}
    required: list[str] = []
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), defaults)
        for group, choice in chosen.items():
            group_file = _preset_file(root, group, choice)
            if group_file is None:
                cfg = OmegaConf.merge(cfg, {"data": {"name": choice}})
                continue
            group_cfg = _load_yaml(group_file)
            # `???` in a group file: the user must give it (a merge would keep the schema's default)
            required += sorted(_keys(group_cfg, missing=True, prefix=f"{group}."))
            cfg = OmegaConf.merge(cfg, {group: group_cfg})
        required += sorted(_keys(experiment, missing=True))
        cfg = OmegaConf.merge(cfg, experiment)
        cfg = OmegaConf.merge(cfg, _parse_overrides(_lists_from_scalars(cfg, overrides)), _nested(verbatim))
        given = {item.partition("=")[0] for item in overrides} | set(verbatim) | _keys(experiment, missing=False)
        missing = [key for key in required if key not in given] + sorted(OmegaConf.missing_keys(cfg))
        if missing and not allow_missing:
            raise SimsearchError(f"'{missing[0]}' must be given, e.g. {missing[0]}=VALUE")
        for key in missing:  # shown as ??? by `simsearch config`
            OmegaConf.update(cfg, key, "???", force_add=True)
        if not missing:
            OmegaConf.resolve(cfg)
            for key, value in verbatim.items():  # resolve() unescapes: keep them literal for every later reader
                OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as error:
        raise SimsearchError(_explain(error)) from None
    except (ValueError, TypeError, KeyError) as error:  # a resolver's own failure (oc.decode, a list of the wrong type)
        raise SimsearchError(f"config error: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    OmegaConf.set_readonly(cfg, False)
    if not missing:
        check_values(cfg)
    return cfg


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if OmegaConf.is_dict(node):
        return [leaf for key in node for leaf in _leaves(node._get_node(key), f"{prefix}{key}.")]
    if OmegaConf.is_list(node):
        return [leaf for i in range(len(node)) for leaf in _leaves(node._get_node(i), f"{prefix[:-1]}[{i}].")]
    return [(prefix[:-1], node._value())]


def check_numbers(cfg: DictConfig) -> None:
    """Every number finite (nan, inf and 1e309 are typos, never settings) and every integer an int64."""
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise SimsearchError(f"{key}={value} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INT:
            raise SimsearchError(f"{key}={value} is out of range: at most {LARGEST_INT} in size")


def check_values(cfg: DictConfig) -> None:
    """Values of the right type but out of range, each refused with one sentence naming the key."""
    check_numbers(cfg)
    for key, minimum in MINIMUMS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < minimum:
            raise SimsearchError(f"{key}={value} is out of range: it must be at least {minimum}")
    for key, maximum in MAXIMUMS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value > maximum:
            raise SimsearchError(f"{key}={value} is out of range: it must be at most {maximum}")
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and (len(value.encode()) > PATH_MAX_BYTES
                                       or any(len(part.encode()) > NAME_MAX_BYTES for part in value.split("/"))):
            raise SimsearchError(f"{key} is too long ({len(value)} characters): a path may hold at most "
                                 f"{PATH_MAX_BYTES} bytes and each name in it {NAME_MAX_BYTES}")
    if not str(cfg.run.dir).strip():
        raise SimsearchError("run.dir is empty: give the store's folder, e.g. run.dir=outputs/photos")
    if cfg.trainer.precision is not None and str(cfg.trainer.precision) not in PRECISIONS:
        raise SimsearchError(f"trainer.precision={cfg.trainer.precision} is not one of {', '.join(PRECISIONS)} "
                             "(or null: simsearch chooses)")
    if cfg.trainer.accelerator not in ACCELERATORS:
        raise SimsearchError(f"trainer.accelerator={cfg.trainer.accelerator} is not one of {', '.join(ACCELERATORS)}")
    if not cfg.serve.upload_timeout_s > 0:
        raise SimsearchError(f"serve.upload_timeout_s={cfg.serve.upload_timeout_s} must be a positive number of seconds")
    if not cfg.serve.header_timeout_s > 0:
        raise SimsearchError(f"serve.header_timeout_s={cfg.serve.header_timeout_s} must be a positive number of seconds")
    if not cfg.serve.max_upload_mb > 0:
        raise SimsearchError(f"serve.max_upload_mb={cfg.serve.max_upload_mb} must be a positive number of megabytes")
    for key in ("model.mean", "model.std"):
        values = OmegaConf.select(cfg, key)
        if values is not None and len(values) not in (1, 3):
            raise SimsearchError(f"{key}={list(values)} must hold 3 numbers (one per channel: R, G, B)")
    if cfg.model.std is not None and any(value <= 0 for value in cfg.model.std):
        raise SimsearchError(f"model.std={list(cfg.model.std)} must be positive numbers (pixels are divided by them)")
    if any(k < 1 for k in cfg.eval.k) or not len(cfg.eval.k):
        raise SimsearchError(f"eval.k={list(cfg.eval.k)} must be one or more positive integers, e.g. eval.k=[1,10]")
    devices = cfg.trainer.devices
    if not (devices == "auto" or devices == -1 or (isinstance(devices, int) and devices >= 1)
            or (OmegaConf.is_list(devices) and len(devices) > 0)
            or (isinstance(devices, str) and devices.replace(",", "").isdigit() and devices.strip(",0") != "")):
        raise SimsearchError(f"trainer.devices={devices} must be a positive count, a list of device ids, -1 or auto")
    if Path(cfg.search.grid).suffix.lower() not in GRID_SUFFIXES:
        raise SimsearchError(f"search.grid={cfg.search.grid} must be an image file name ending in "
                             f"{', '.join(GRID_SUFFIXES)}")


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the fully resolved config next to an output (beside, then renamed: never left half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, OmegaConf.to_yaml(cfg, resolve=True))


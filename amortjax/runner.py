"""Experiment machinery: configs with presets, command-line overrides, results folders.

An experiment is a module `experiments/<name>.py` with

- `Config`: a frozen dataclass whose defaults are the `quick` preset,
- `PRESETS`: preset name -> field overrides (at least "quick" and "paper"),
- `run(config, workdir) -> dict`: trains and evaluates, writing into `workdir` its checkpoint,
  `metrics.json`, `report.md` and figures; returns the metrics.

`run_experiment` resolves the config (preset, then `key=value` overrides, checked against the
dataclass's field types), makes a fresh results folder, saves the resolved config there before
anything runs, and calls `run`. Resuming a folder reuses its saved config, and the experiment's
trainer picks up its last checkpoint. This module knows nothing of models or data.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import pkgutil
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
EXPERIMENTS_PACKAGE = "experiments"


def available_experiments() -> list[str]:
    """Names of the modules in the experiments package."""
    package = importlib.import_module(EXPERIMENTS_PACKAGE)
    return sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")
    )


def load_experiment(name: str) -> types.ModuleType:
    """Imports `experiments.<name>`, with an error listing the available ones."""
    names = available_experiments()
    if name not in names:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(names)}")
    return importlib.import_module(f"{EXPERIMENTS_PACKAGE}.{name}")


def _parse_value(key: str, text: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if kind in (int, float, str):
            return kind(text)
        if origin is tuple:
            (item, *_) = typing.get_args(kind)
            stripped = text.strip().strip("()[]")
            return tuple(item(v) for v in stripped.split(",") if v.strip())
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if text.strip().lower() == "none":
                return None
            return _parse_value(key, text, args[0])
    except ValueError:
        pass
    else:
        raise TypeError(f"option {key!r} has a type the command line cannot set: {kind}")
    raise ValueError(
        f"option {key}={text!r}: expected a value of type {getattr(kind, '__name__', kind)}"
    )


def apply_overrides(config: Any, overrides: dict[str, Any] | Sequence[str]) -> Any:
    """A copy of config with fields replaced.

    Args:
        config: a dataclass instance.
        overrides: a dict of field values, or `key=value` strings parsed by the field's type
            (tuples as `400,400`; booleans as true/false).

    Returns:
        The new config.

    Raises:
        ValueError: an unknown option (the known ones are listed) or an unparsable value.
    """
    hints = typing.get_type_hints(type(config))
    if not isinstance(overrides, dict):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            key, text = item.split("=", 1)
            key = key.strip()
            if key not in hints:
                raise ValueError(f"unknown option {key!r}; options are: {', '.join(hints)}")
            parsed[key] = _parse_value(key, text, hints[key])
        overrides = parsed
    unknown = [k for k in overrides if k not in hints]
    if unknown:
        raise ValueError(f"unknown options {unknown}; options are: {', '.join(hints)}")
    return dataclasses.replace(config, **overrides)


def resolve_config(module: types.ModuleType, preset: str, overrides: Sequence[str] = ()) -> Any:
    """The experiment's config for a preset, with overrides applied."""
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(module.PRESETS)}")
    config = apply_overrides(module.Config(), dict(module.PRESETS[preset]))
    return apply_overrides(config, list(overrides))


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict) -> Any:
    """Rebuilds a config saved as JSON (lists back to tuples)."""
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ValueError(f"saved config has options {unknown} that {cls.__qualname__} lacks")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path


def new_workdir(root: str | Path, name: str, preset: str) -> Path:
    """A fresh folder `root/name/<UTC time>_<preset>` (suffixed if it exists)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / name / f"{stamp}_{preset}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def run_experiment(
    name: str,
    *,
    preset: str = "quick",
    overrides: Sequence[str] = (),
    results_root: str | Path = "results",
    resume: str | Path | None = None,
) -> tuple[Path, dict]:
    """Runs an experiment into a fresh results folder, or resumes one.

    Args:
        name: module name in `experiments/`.
        preset: a key of the module's `PRESETS`.
        overrides: `key=value` strings.
        results_root: parent of the results folders.
        resume: an earlier results folder: its saved config is used (overrides still apply,
            e.g. more epochs) and training continues from its checkpoint.

    Returns:
        `(workdir, metrics)`.
    """
    module = load_experiment(name)
    if resume is not None:
        workdir = Path(resume)
        saved = workdir / CONFIG_FILE
        if not saved.exists():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist")
        config = config_from_dict(module.Config, json.loads(saved.read_text())["config"])
        config = apply_overrides(config, list(overrides))
    else:
        config = resolve_config(module, preset, overrides)
        workdir = new_workdir(results_root, name, preset)
    write_json(
        workdir / CONFIG_FILE,
        {
            "experiment": name,
            "preset": preset,
            "overrides": list(overrides),
            "config": config_to_dict(config),
        },
    )
    return workdir, module.run(config, workdir)

"""Experiment machinery: configs with presets, command-line overrides, results folders.

An experiment is a module `experiments/<name>.py` with

- `Config`: a frozen dataclass whose defaults are the `quick` preset,
- `PRESETS`: preset name -> field overrides (at least "quick" and "paper"),
- `run(config, workdir) -> dict`: trains and evaluates, writing into `workdir` its checkpoint,
  `metrics.json`, `report.md` and figures; returns the metrics,
- `RESUMABLE_OPTIONS`: the options a resume may change (below).

`run_experiment` resolves the config (preset, then `key=value` overrides, checked against the
dataclass's field types), makes a fresh results folder, saves the resolved config there before
anything runs (with the code that runs it: `code_version`, the git commit and the package
versions), and calls `run`. Resuming a folder reuses its saved config, and the experiment's
trainer picks up its last checkpoint.

What a resume may change. A results folder's checkpoints hold models trained under its
options, so a resume never changes an option that decides what is trained: it continues the
training and recomputes what the new options change. An experiment lists in
`RESUMABLE_OPTIONS` the options a resume may change: the number of epochs (training
continues; fewer epochs than a checkpoint has is refused by `fit`), and the options of
evaluations that are recomputed from the trained models (results saved per model are reused
only under the config that made them, up to the options the experiment names as not entering
them; a superseded one is kept beside its replacement: `load_saved_result`). Any other change, e.g.
`learning_rate`, `batch_size` or `seed`, is refused before anything runs, naming each option
with its old and new value, and the fix: a fresh run (`--results`) with the new values, or the
resume with the old ones. Options that draw what is recorded during training (e.g. the gap
curves' points) are fixed with it, since their earlier values cannot be recomputed. Behind
this, `fit` refuses any checkpoint trained under another `training_fingerprint`.

This module knows nothing of models, and of data only the split sizes (to refuse a minibatch
larger than a training set).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import json
import math
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amortjax.data import split_sizes
from amortjax.inference.training import CheckpointAheadError

CONFIG_FILE = "config.json"
EXPERIMENTS_PACKAGE = "experiments"


def available_experiments() -> list[str]:
    """Names of the experiment modules in the experiments package (all but its machinery: this
    runner and the watchdog)."""
    package = importlib.import_module(EXPERIMENTS_PACKAGE)
    machinery = {__name__.rpartition(".")[2], "watchdog"}
    return sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_") and m.name not in machinery
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
    raise ValueError(f"option {key}={text!r}: expected {_type_text(kind)}")


def _type_text(kind: Any) -> str:
    """What the command line expects for an option of type `kind`, with an example."""
    if typing.get_origin(kind) is tuple:
        (item, *_) = typing.get_args(kind)
        name = getattr(item, "__name__", item)
        example = "200,200" if item is int else "0.1,0.5" if item is float else "a,b"
        return f"comma-separated {name}s, e.g. {example}"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return f"{_type_text(args[0])} or none"
    return f"a value of type {getattr(kind, '__name__', kind)}"


def _is_group(kind: Any) -> bool:
    """A settings group: a NamedTuple type (e.g. `QStarSettings`) whose fields are options."""
    return isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")


def option_names(config_type: type) -> list[str]:
    """Every option a config takes: its fields, and `group.field` for its settings groups."""
    names = []
    for name, kind in typing.get_type_hints(config_type).items():
        if _is_group(kind):
            names += [f"{name}.{field}" for field in kind._fields]
        else:
            names.append(name)
    return names


def _option_kind(config_type: type, key: str) -> Any:
    hints = typing.get_type_hints(config_type)
    group, _, field = key.partition(".")
    if group in hints and _is_group(hints[group]):
        if not field:
            fields = ", ".join(f"{group}.{f}" for f in hints[group]._fields)
            raise ValueError(f"option {group!r} is a group: set its fields ({fields})")
        group_hints = typing.get_type_hints(hints[group])
        if field in group_hints:
            return group_hints[field]
    elif key in hints and not field:
        return hints[key]
    raise ValueError(f"unknown option {key!r}; options are: {', '.join(option_names(config_type))}")


def apply_overrides(config: Any, overrides: dict[str, Any] | Sequence[str]) -> Any:
    """A copy of config with options replaced.

    Args:
        config: a dataclass instance; a field typed as a NamedTuple (a settings group such as
            `QStarSettings`) takes `group.field` options.
        overrides: a dict of option values, or `key=value` strings parsed by the option's type
            (tuples as `400,400`; booleans as true/false; `qstar.learning_rate=1e-3`).

    Returns:
        The new config.

    Raises:
        ValueError: an unknown option (the known ones are listed) or an unparsable value.
    """
    config_type = type(config)
    if not isinstance(overrides, dict):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            key, text = item.split("=", 1)
            key = key.strip()
            parsed[key] = _parse_value(key, text, _option_kind(config_type, key))
        overrides = parsed
    plain, groups = {}, {}
    hints = typing.get_type_hints(config_type)
    for key, value in overrides.items():
        if key in hints and _is_group(hints[key]) and isinstance(value, hints[key]):
            plain[key] = value  # a whole settings group
            continue
        _option_kind(config_type, key)  # refuses unknown names
        group, _, field = key.partition(".")
        if field:
            groups.setdefault(group, {})[field] = value
        else:
            plain[key] = value
    config = dataclasses.replace(config, **plain)
    return dataclasses.replace(
        config, **{g: getattr(config, g)._replace(**fields) for g, fields in groups.items()}
    )


# Range rules by option name, checked for every experiment's Config before any data is loaded.
# Integers (and the items of integer tuples) must be >= 1 unless named here.
_MIN_ZERO_INTS = frozenset(
    {
        "seed",
        "num_steps",
        "test_steps",
        "frontier_steps",
        "num_decays",
        "final_samples",
        "monitor_samples",
        "polish_steps",
        "certify_samples",
        "certify_retries",
        "random_starts",
    }
)
# Floats must be finite, and > 0 when their name ends in one of these ...
_POSITIVE_FLOATS = ("learning_rate", "step_size", "adam_eps", "max_grad_norm", "sigmoid_delta")
# ... or >= 0 when named here, or in [0, 1) for momentum.
_MIN_ZERO_FLOATS = frozenset({"beta", "activity_threshold", "kl_warmup_epochs", "min_improvement"})


def _options(config: Any) -> list[tuple[str, Any, Any]]:
    """(name, type, value) of every option, `group.field` for the fields of settings groups."""
    out = []
    for name, kind in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        if _is_group(kind):
            group_hints = typing.get_type_hints(kind)
            out += [(f"{name}.{f}", group_hints[f], getattr(value, f)) for f in kind._fields]
        else:
            out.append((name, kind, value))
    return out


def check_config(config: Any) -> None:
    """Checks the type and range of every option of an experiment's config.

    Every check runs before anything is loaded or written, so a bad option costs nothing. An
    experiment adds its own couplings between options as a `check()` method on its Config,
    called here last.

    Raises:
        ValueError: naming the option, its value and what it must be.
    """
    for name, kind, value in _options(config):
        if value is None:
            continue
        origin = typing.get_origin(kind)
        if origin is tuple:
            items, kind = value, typing.get_args(kind)[0]
        else:
            items = (value,)
            if origin in (typing.Union, types.UnionType):
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
        for item in items:
            base = name.rpartition(".")[2]  # a group's field follows its own name's rules
            if kind is int:
                low = 0 if base in _MIN_ZERO_INTS else 1
                if item < low:
                    raise ValueError(f"option {name}={value!r}: must be an integer >= {low}")
            elif kind is float:
                if not math.isfinite(item):
                    raise ValueError(f"option {name}={value!r}: must be a finite number")
                if base.endswith(_POSITIVE_FLOATS) and item <= 0:
                    raise ValueError(f"option {name}={value!r}: must be > 0")
                if base in _MIN_ZERO_FLOATS and item < 0:
                    raise ValueError(f"option {name}={value!r}: must be >= 0")
                if base.endswith("momentum") and not 0 <= item < 1:
                    raise ValueError(f"option {name}={value!r}: must be in [0, 1)")
        if origin is tuple and not value and not name.endswith("_hidden"):
            raise ValueError(f"option {name}=(): give at least one value")
    check = getattr(config, "check", None)
    if callable(check):
        check()


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Refuses an option (a string, or a tuple of them) naming anything outside `choices`."""
    values = value if isinstance(value, tuple) else (value,)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(
            f"option {name}={value!r}: unknown {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(choices)}"
        )


def check_at_most(
    name: str, value: int | None, limit_name: str, limit: int | None, *, fixed: bool = False
) -> None:
    """Refuses `name` > `limit_name` (None meaning "all", i.e. no limit); `fixed` when the
    limit is not an option (a dataset's size)."""
    if value is not None and limit is not None and value > limit:
        fix = f"lower {name}" if fixed else f"lower {name} or raise {limit_name}"
        raise ValueError(f"option {name}={value} exceeds {limit_name}={limit}; {fix}")


def check_batch_fits(batch_size: int, dataset: str, **split_options: Any) -> None:
    """Refuses a minibatch larger than the dataset's training split (`split_options`: those of
    `split_sizes`, e.g. validation_size)."""
    rows = split_sizes(dataset, **split_options)["train"]
    check_at_most("batch_size", batch_size, f"{dataset}'s training rows", rows, fixed=True)


def check_set_elsewhere(group: str, settings: Any, fields: dict[str, str]) -> None:
    """Refuses fields of a settings group that the experiment sets itself (`fields`: name ->
    the option that sets it), so that they are never silently ignored."""
    defaults = type(settings)()
    for field, instead in fields.items():
        if getattr(settings, field) != getattr(defaults, field):
            raise ValueError(
                f"option {group}.{field}={getattr(settings, field)!r}: this experiment sets it "
                f"itself ({instead}); leave it out"
            )


def resolve_config(module: types.ModuleType, preset: str, overrides: Sequence[str] = ()) -> Any:
    """The experiment's config for a preset, with overrides applied and every option checked."""
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(module.PRESETS)}")
    config = apply_overrides(module.Config(), dict(module.PRESETS[preset]))
    config = apply_overrides(config, list(overrides))
    check_config(config)
    return config


def upgrade_adam_blocks(data: dict, group: str = "qstar") -> dict:
    """A q* group saved before 2026-12-07 (Adam, no `block_size`) ran Adam's blocks of 50 then
    (its patience was saved): read as `block_size=50`, not as today's monitor default of 400.
    (A folder saved since with `block_size=none` on purpose is read so too: resume it with
    `qstar.block_size=400` to keep today's default.)"""
    qstar = data.get(group)
    if qstar is None:  # saved before the settings groups: flat options, Adam's then
        return {f"{group}.block_size": 50, f"{group}.patience": 4, **data}
    if (
        isinstance(qstar, dict)
        and qstar.get("method") == "adam"
        and qstar.get("block_size") is None
    ):
        data = {**data, group: {"patience": 4, **qstar, "block_size": 50}}
    return data


def config_to_dict(config: Any) -> dict:
    """The config as JSON-ready data, a settings group as a dict of its fields."""
    return {
        f.name: value._asdict() if _is_group(type(value)) else value
        for f in dataclasses.fields(config)
        for value in [getattr(config, f.name)]
    }


def config_from_dict(cls: type, data: dict, renamed: dict[str, str] | None = None) -> Any:
    """Rebuilds a config saved as JSON (lists back to tuples, groups back to their type).
    Options saved under an experiment's earlier names (`renamed`, the module's
    `RENAMED_OPTIONS`, e.g. "qstar_learning_rate" -> "qstar.learning_rate") are read under
    their new ones (a saved group, a dict, is never renamed)."""
    renamed = renamed or {}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    groups: dict[str, dict] = {}
    for key, value in data.items():
        value = tuple(value) if isinstance(value, list) else value
        if not isinstance(value, dict):
            key = renamed.get(key, key)
        group, _, field = key.partition(".")
        if field:
            groups.setdefault(group, {})[field] = value
        elif key in hints and _is_group(hints[key]) and isinstance(value, dict):
            groups.setdefault(key, {}).update(value)
        else:
            values[key] = value
    unknown = [k for k in values if k not in hints] + [g for g in groups if g not in hints]
    if unknown:
        raise ValueError(f"saved config has options {unknown} that {cls.__qualname__} lacks")
    config = cls(**values)
    for group, fields in groups.items():
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        config = dataclasses.replace(config, **{group: getattr(config, group)._replace(**fields)})
    return config


def write_json(path: str | Path, obj: Any) -> Path:
    """Writes obj as JSON atomically: to a temporary file in the same folder, then renamed.

    A kill at any moment leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, default=float) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, fix: str | None = None) -> Any:
    """Reads a JSON file; a damaged one raises a ValueError that names it and the fix (`fix`;
    by default: delete it and run again to recompute it, right for a result, not for a file
    that cannot be recomputed, such as a results folder's config.json)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fix = fix or "delete it and run again to recompute it"
        raise ValueError(
            f"{path} is not valid JSON ({err}); it was damaged outside amortjax (its writes "
            f"are atomic): {fix}"
        ) from err


def _flat(config: dict) -> dict[str, Any]:
    """A saved config's options, a settings group's fields as `group.field`."""
    flat = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{field}": v for field, v in value.items()})
        else:
            flat[name] = value
    return flat


def _supersede(path: Path) -> Path:
    """Moves a saved result that will be recomputed to `<name>.superseded-<n>.json` beside it,
    so that nothing computed is lost (the files a run reads are named without the suffix)."""
    n = 1
    while (kept := path.with_name(f"{path.stem}.superseded-{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept


@functools.cache
def _this_code() -> dict[str, Any]:
    return code_version()


def _code_text(code: dict | None) -> str:
    if not code:
        return "unrecorded code"
    dirty = " with uncommitted changes" if code.get("dirty") else ""
    packages = ", ".join(f"{k} {v}" for k, v in sorted((code.get("packages") or {}).items()))
    return (
        f"commit {code.get('commit')}{dirty} (python {code.get('python')}, {packages}; "
        f"{code.get('backend')})"
    )


def load_saved_result(path: str | Path, config: Any, ignore: Sequence[str] = ()) -> dict | None:
    """A result saved by `write_json` with its config under "config", if it is reusable.

    Args:
        path: the saved result (e.g. `models/<name>.json`).
        config: the config of the run that would reuse it.
        ignore: options that cannot change this result (a group's name covers its fields),
            e.g. how often checkpoints are written, or the options of other results: a
            result saved under other values of only these is reused. Name only options
            verified not to enter the result's numbers.

    Returns:
        The saved dict when the file exists, is valid JSON and was computed under `config`
        up to `ignore`; otherwise None (the caller recomputes it), with a note on stderr
        naming the options that differ (old -> new), and the old file moved aside to
        `<name>.superseded-<n>.json`. A result reused although made by other code than this
        run's (its "code", `code_version`, if the caller saved it) is reused with a note
        naming both versions; one made by a checkout with uncommitted changes counts as other
        code, since its commit does not say what ran.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        kept = _supersede(path)
        print(f"note: {path} is damaged; recomputing it (the damaged file: {kept})",
              file=sys.stderr)  # fmt: skip
        return None
    old = _flat(saved.get("config") or {})
    new = _flat(json.loads(json.dumps(config_to_dict(config), default=float)))
    differ = [
        f"{name}: {old.get(name, '(unset)')!r} -> {new.get(name, '(unset)')!r}"
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name) and not {name, name.partition(".")[0]} & set(ignore)
    ]
    if differ:
        kept = _supersede(path)
        print(
            f"note: {path} was computed under other settings ({'; '.join(differ)}); "
            f"recomputing it (the old result is kept as {kept.name})",
            file=sys.stderr,
        )
        return None
    code, this = saved.get("code"), _this_code()
    same = code is not None and not code.get("dirty") and not this.get("dirty")
    keys = ("commit", "python", "packages", "backend")
    if not same or any(code.get(k) != this.get(k) for k in keys):
        print(
            f"NOTE: reusing {path}, made by other code than this run's (or code that cannot "
            f"be told apart): it was made by {_code_text(code)}; this run is "
            f"{_code_text(this)}. Its numbers are those of the code named in it; move it away "
            "to recompute it with this code",
            file=sys.stderr,
        )
    return saved


def check_resumable(module: types.ModuleType, name: str, workdir: Path, saved: Any, config: Any):
    """Refuses a resume of `workdir`, whose models were trained under config `saved`, that
    changes an option outside the experiment's `RESUMABLE_OPTIONS` (a group's name there
    covers its fields). An experiment without the list is not checked here (`fit` still
    refuses checkpoints trained under other settings).

    Raises:
        ValueError: naming each such option, its old and new value, and the fix.
    """
    resumable = getattr(module, "RESUMABLE_OPTIONS", None)
    if resumable is None:
        return
    old = {option: value for option, _, value in _options(saved)}
    changed = [
        f"{option}={value!r} (trained with {old[option]!r})"
        for option, _, value in _options(config)
        if value != old[option] and not {option, option.partition(".")[0]} & set(resumable)
    ]
    if changed:
        raise ValueError(
            f"cannot resume {workdir} with {', '.join(changed)}: these options decide what is "
            "trained, and its checkpoints were trained under the old values. Start a fresh "
            f"run with the new values (python -m experiments {name} --results <folder> "
            "key=value ...), or resume with the old ones; a resume may change only "
            f"{', '.join(resumable)}"
        )


def code_version(exclude: Sequence[str] = ()) -> dict[str, Any]:
    """What code made a result, saved beside it (`config.json`, each bench result).

    Args:
        exclude: paths (relative to the checkout) whose changes do not make it "dirty": where
            tracked results are being written (`bench/results`).

    Returns:
        `{"commit": the git commit of this checkout, or None where this code is not the top
        of a git checkout (an installed copy) or git is missing; "dirty": whether tracked
        files differed from that commit (None where the commit is); "python": its version;
        "packages": the installed versions of jax, jaxlib, numpyro, flax, optax and numpy;
        "backend": JAX's default backend; "devices": its
        devices}`. A result whose commit is dirty was made by code that no commit holds.
    """
    import importlib.metadata
    import platform

    import jax

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    # only this checkout's own repository: an installed copy inside another repository (a
    # virtual environment in a user's project) must not report that project's commit
    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and Path(top).resolve() == root else None
    excluded = [f":(exclude){path}" for path in exclude]
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    status = status if commit else None
    packages = {}
    for package in ("jax", "jaxlib", "numpyro", "flax", "optax", "numpy"):
        try:
            packages[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            packages[package] = None
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "packages": packages,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def new_workdir(root: str | Path, name: str, preset: str) -> Path:
    """A fresh folder `root/name/<UTC time>_<preset>` (suffixed if it exists)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / name / f"{stamp}_{preset}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, i = base, 1
    while True:  # mkdir is atomic: of two runs started in the same second, one gets "-1"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, i = base.with_name(f"{base.name}-{i}"), i + 1


def run_experiment(
    name: str,
    *,
    preset: str = "quick",
    overrides: Sequence[str] = (),
    results_root: str | Path = "results",
    resume: str | Path | None = None,
    on_workdir: Callable[[Path], None] | None = None,
) -> tuple[Path, dict]:
    """Runs an experiment into a fresh results folder, or resumes one.

    Args:
        name: module name in `experiments/`.
        preset: a key of the module's `PRESETS`.
        overrides: `key=value` strings.
        results_root: parent of the results folders.
        resume: an earlier results folder: its saved config is used (overrides of the
            experiment's `RESUMABLE_OPTIONS` still apply, e.g. more epochs or more IWAE
            samples) and training continues from its checkpoint. `config.json` keeps the
            original preset, overrides and code (`code_version`), and lists each resume, with
            its own code and how it ended ("status": "completed", "interrupted", "failed:
            <exception>"; "started" if the process was killed), under "history". A refused
            resume, or one that failed or was interrupted before writing anything, leaves it
            as it was; one that wrote a checkpoint or a result under the new options keeps
            them there, so that config.json always describes what the folder holds.
        on_workdir: called with the results folder once it is made (a fresh run) or checked
            (a resume), before the experiment runs: the command line prints it, and names it
            in the resume command of an interrupted or hung run.

    Returns:
        `(workdir, metrics)`.

    Raises:
        ValueError: an unknown or out-of-range option, a folder of another experiment, or a
            resume that changes an option that decides what is trained.
        FileNotFoundError: a resume folder without a config.json.
    """
    module = load_experiment(name)
    if resume is None:
        config = resolve_config(module, preset, overrides)
        workdir = new_workdir(results_root, name, preset)
        record = {
            "experiment": name,
            "preset": preset,
            "overrides": list(overrides),
            "config": config_to_dict(config),
            "code": code_version(),
            "history": [],
        }
        write_json(workdir / CONFIG_FILE, record)
        if on_workdir is not None:
            on_workdir(workdir)
        try:
            return workdir, module.run(config, workdir)
        except BaseException:
            # a run that failed before writing anything else leaves no folder behind
            if [p.name for p in workdir.iterdir()] == [CONFIG_FILE]:
                shutil.rmtree(workdir, ignore_errors=True)
            raise

    workdir = Path(resume)
    saved = workdir / CONFIG_FILE
    if not saved.exists():
        raise FileNotFoundError(
            f"cannot resume: {saved} does not exist (give the results folder of an earlier run, "
            f"e.g. results/{name}/<time>_<preset>)"
        )
    record = read_json(
        saved,
        fix=(
            "it holds the options this folder's models were trained under, and cannot be "
            "recomputed; do not delete it (without it the folder cannot be resumed): restore it "
            f"from a backup, or start a fresh run (python -m experiments {name} --results "
            "<folder> ...)"
        ),
    )
    if record.get("experiment", name) != name:
        raise ValueError(
            f"cannot resume {workdir} as {name}: that folder holds a {record['experiment']} run "
            f"(python -m experiments {record['experiment']} --resume {workdir})"
        )
    # an experiment whose options changed meaning upgrades an older folder's config first
    upgrade = getattr(module, "upgrade_saved_config", lambda data: data)
    saved_config = config_from_dict(
        module.Config, upgrade(record["config"]), getattr(module, "RENAMED_OPTIONS", None)
    )
    config = apply_overrides(saved_config, list(overrides))
    check_config(config)
    check_resumable(module, name, workdir, saved_config, config)
    # config.json keeps the original options and records each resume; it is rewritten only
    # once the resumed run's options are checked. If the resumed run fails or is interrupted,
    # it is put back only when the run wrote nothing: once a checkpoint, a saved result or the
    # metrics were written under the new options, config.json must keep describing them (its
    # history entry then says how the resume ended).
    before = saved.read_text()
    files_before = _file_stamps(workdir)
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "overrides": list(overrides),
        "code": code_version(),
        "status": "started",  # left so by a killed process
    }
    history = [*record.get("history", []), entry]
    resumed = {**record, "config": config_to_dict(config), "history": history}
    write_json(saved, resumed)
    if on_workdir is not None:
        on_workdir(workdir)
    try:
        try:
            metrics = module.run(config, workdir)
        except CheckpointAheadError as err:
            option = err.option
            raise ValueError(
                f"cannot resume {workdir} with {option}={err.epochs}: its checkpoint "
                f"{err.directory} has trained {err.trained} epochs already, and a resume cannot "
                f"train fewer. Resume with {option}={err.trained} or more (python -m experiments "
                f"{name} --resume {workdir} {option}={err.trained}), or start a fresh run for "
                f"{err.epochs} (python -m experiments {name} --results <folder> "
                f"{option}={err.epochs} ...)"
            ) from err
    except BaseException as err:
        if _file_stamps(workdir) == files_before:
            tmp = saved.with_name(f".{saved.name}.restore")
            tmp.write_text(before)
            os.replace(tmp, saved)
        else:
            interrupted = isinstance(err, KeyboardInterrupt)
            entry["status"] = "interrupted" if interrupted else f"failed: {type(err).__name__}"
            write_json(saved, resumed)
        raise
    entry["status"] = "completed"
    write_json(saved, resumed)
    return workdir, metrics


def _file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(modification time, size) of every file under folder but config.json: what a run
    wrote there changes it."""
    stamps = {}
    for path in folder.rglob("*"):
        name = str(path.relative_to(folder))
        try:
            if name != CONFIG_FILE and path.is_file():
                stat = path.stat()
                stamps[name] = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:  # a temporary file renamed meanwhile
            continue
    return stamps

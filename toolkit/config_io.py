"""Loading a RunConfig: YAML plus dotted `--set` overrides, every problem reported at once as ConfigError
(file or --set, dotted key, what is allowed); the YAML dump and the Markdown reference of every key.

Imports neither torch nor accelerate, like config.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from toolkit.config import RunConfig, _CrossFieldProblem
from toolkit.errors import ConfigError, did_you_mean

def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a file of that name in ./configs (with or without .yaml)."""
    candidates = [Path(path)]
    for base in (Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"):
        candidates += [base / str(path), base / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in (Path.cwd() / "configs").glob("*.yaml"))
    hint = did_you_mean(Path(path).name, available)
    listing = f"; configs/ has: {', '.join(available)}" if available else ""
    raise ConfigError([f"{path}: config file not found{hint}{listing}"])


def _wants_text(parts: list[str]) -> bool:
    """Whether the key at this dotted path takes text (str, Optional[str], a Literal of strings)."""
    model: type[BaseModel] = RunConfig
    for part in parts[:-1]:
        annotation = getattr(model.model_fields.get(part), "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    field = model.model_fields.get(parts[-1])
    if field is None:
        return False
    annotation = field.annotation
    if get_origin(annotation) is Union:
        annotation = next((a for a in get_args(annotation) if a is not type(None)), None)
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    return annotation is str


def parse_overrides(overrides: list[str]) -> dict:
    """['optim.lr=3e-4', 'train.epochs=2'] -> nested dict, values parsed as YAML, except where the key
    takes text: there the text is kept as typed (run_name=no is 'no', not false; run_name=2024 is '2024')."""
    nested: dict = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if value is not None and not isinstance(value, (str, dict, list)) and _wants_text(parts):
            value = raw.strip()
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {part} is set both as a value and as a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return nested


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _flatten(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.add(dotted)
        if isinstance(value, dict):
            keys |= _flatten(value, f"{dotted}.")
    return keys


def read_command_line(path: str | Path | None, overrides: list[str] | None) -> tuple[dict, dict, str, Path | None]:
    """The YAML file (optional) and the parsed overrides, unvalidated: (file tree, overrides tree, label of
    the file for messages, the file found)."""
    raw: dict = {}
    label = "<defaults>"
    source = None
    if path is not None:
        source = resolve_config_path(path)
        label = str(path) if Path(path).is_file() else str(source)
        try:
            raw = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError([f"{label}:{where} not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{label}: expected a mapping of sections (data:, model:, ...), got {type(raw).__name__}"])
    return raw, parse_overrides(overrides or []), label, source


def merge_command_line(raw: dict, extra: dict, source: Path | None) -> dict:
    """File and overrides merged, the run named after the file where nothing names it."""
    merged = _merge(raw, extra)
    if source is not None and (merged.get("train") or {}).get("run_name") is None:
        merged.setdefault("train", {})
        if isinstance(merged["train"], dict):
            merged["train"]["run_name"] = source.stem
    return merged


def validate(tree: dict, label: str, from_overrides: set[str]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, label, from_overrides)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional), apply overrides, validate; every problem reported at once as ConfigError."""
    raw, extra, label, source = read_command_line(path, overrides)
    return validate(merge_command_line(raw, extra, source), label, _flatten(extra))


def _describe_allowed(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (a path of section names) in the RunConfig tree."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


# Our own words for pydantic's error types (its messages change between releases; these do not).
BOUNDS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
          "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}
TYPES = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
         "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
         "bool_type": "true or false", "string_type": "text", "list_type": "a list"}


# Other trainers' names for our keys (timm, Lightning, Keras, the tutorials), where spelling alone would
# not find ours: 'learning_rate' is far from 'lr'. Each maps to the keys it may mean, tried in the section.
SYNONYMS = {
    "learning_rate": ("lr",), "lr_rate": ("lr",), "base_lr": ("lr",), "wd": ("weight_decay",),
    "decay": ("weight_decay",), "optimizer": ("name",), "opt": ("name",), "scheduler": ("name",),
    "sched": ("name",), "arch": ("name",), "architecture": ("name",), "model": ("name",), "dataset": ("name",),
    "num_epochs": ("epochs",), "max_epochs": ("epochs",), "n_epochs": ("epochs",), "epoch": ("epochs",),
    "bs": ("batch_size",), "batch": ("batch_size",), "train_batch_size": ("batch_size",),
    "eval_batch": ("eval_batch_size",), "val_batch_size": ("eval_batch_size",), "workers": ("num_workers",),
    "img_size": ("image_size",), "input_size": ("image_size",), "resolution": ("image_size",),
    "size": ("image_size",), "in_channels": ("channels",), "num_channels": ("channels",),
    "precision": ("mixed_precision",), "amp": ("mixed_precision",), "early_stopping": ("patience",),
    "accumulate_grad_batches": ("grad_accum_steps",), "gradient_accumulation_steps": ("grad_accum_steps",),
    "grad_clip": ("clip_grad_norm",), "gradient_clip_val": ("clip_grad_norm",), "clip_grad": ("clip_grad_norm",),
    "smoothing": ("label_smoothing",), "output": ("output_dir",), "out_dir": ("output_dir",),
    "name": ("run_name",), "pretrained": ("torchvision_weights", "pretrained_weights"),
    "weights": ("torchvision_weights", "pretrained_weights"), "checkpoint": ("pretrained_weights",),
    "data_dir": ("root",), "path": ("root",), "dir": ("root",), "classes": ("num_classes",),
    "n_classes": ("num_classes",), "freeze": ("freeze_backbone",), "warmup": ("warmup_epochs",),
}


def format_errors(exc: ValidationError, label: str, from_overrides: set[str]) -> list[str]:
    """One line per problem: '<file or --set>: <dotted.key>: <what is wrong and what is allowed>'."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in ("function-after",))
        value = err.get("input")
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _CrossFieldProblem):
            for key, bad, message in ctx_error.problems:
                dotted = ".".join(map(str, (*loc, key)))
                shown = "" if bad is None else f" {bad!r}"
                origin = "--set" if dotted in from_overrides else label
                lines.append(f"{origin}: {dotted}:{shown} {message}")
            continue
        dotted = ".".join(map(str, loc)) or "<top level>"
        origin = "--set" if dotted in from_overrides else label
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _describe_allowed(RunConfig, loc[:-1])
            synonym = next((k for k in SYNONYMS.get(str(loc[-1]).lower().replace("-", "_"), ()) if k in allowed), None)
            hint = f" (did you mean {synonym!r}?)" if synonym else did_you_mean(loc[-1], allowed)
            message = f"unknown key{hint}; allowed here: {', '.join(allowed)}"
        elif kind == "literal_error":
            expected = err["ctx"]["expected"]
            choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
            message = f"{value!r} is not one of {expected}{did_you_mean(value, choices)}"
            if isinstance(value, bool):
                message += "; YAML reads a bare yes, no, on, off, true or false as true or false: quote it"
        elif kind == "model_type" or kind == "model_attributes_type":
            message = f"expected a section (a mapping of keys), got {value!r}"
        elif kind == "missing":
            message = "is required"
        elif kind in BOUNDS:
            bound, words = BOUNDS[kind]
            message = f"{value!r} must be {words} {err['ctx'][bound]}"
        elif kind == "string_type" and isinstance(value, bool):
            message = (f"{value!r} is not text: YAML reads a bare yes, no, on, off, true or false as true or false; "
                       "quote it ('no')")
        elif kind in TYPES:
            message = f"{value!r} is not {TYPES[kind]}"
        else:
            message = f"{value!r} is invalid: {err['msg'].removeprefix('Value error, ')}"
        lines.append(f"{origin}: {dotted}: {message}")
    return lines


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


SCHEMA_ID = "urn:toolkit:run-config"


def schema() -> dict:
    """The JSON Schema of config files, with the $schema and $id that editors and validators look for
    (configs/schema.json is this, kept current by a test; see README, "Editor support")."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **RunConfig.model_json_schema()}


def docs_markdown() -> str:
    """A Markdown table of every key: default, what is allowed, description (for the README)."""
    rows = ["| key | default | allowed | description |", "|---|---|---|---|"]
    for section_name, section_field in RunConfig.model_fields.items():
        _rows_for(section_field.annotation, section_name, rows)
    return "\n".join(rows)


def _allowed(field) -> str:
    import typing

    annotation = field.annotation
    args = [annotation] if typing.get_origin(annotation) in (Literal, dict, list) else (
        [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation])
    literal = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
    if literal:
        return ", ".join(f"`{v}`" for v in literal)
    bounds = []
    for item in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign} {getattr(item, attr)}")
    kind = " or ".join({dict: "mapping"}.get(typing.get_origin(a), getattr(a, "__name__", str(a))) for a in args)
    nullable = type(None) in typing.get_args(annotation)
    return kind + (" " + ", ".join(bounds) if bounds else "") + (" or null" if nullable else "")


def _rows_for(model: type[BaseModel], prefix: str, rows: list[str]) -> None:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _rows_for(annotation, f"{prefix}.{name}", rows)
            continue
        default = field.default if field.default_factory is None else field.default_factory()
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()  # one line
        rows.append(f"| `{prefix}.{name}` | `{shown}` | {_allowed(field)} | {field.description} |")


DOCS_START, DOCS_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def update_docs(path: Path) -> bool:
    """Replace the block between the markers in `path` with the current table; True if changed."""
    text = Path(path).read_text()
    head, _, rest = text.partition(DOCS_START)
    _, _, tail = rest.partition(DOCS_END)
    new = f"{head}{DOCS_START}\n{docs_markdown()}\n{DOCS_END}{tail}"
    Path(path).write_text(new)
    return new != text

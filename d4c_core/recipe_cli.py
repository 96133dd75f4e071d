"""Command-line flags generated from the recipe's field declarations.

``d4c quantize`` and ``d4c submit`` both call ``add_recipe_args`` and ``recipe_from_args``, so
every recipe field is a flag (``--recon-iters``, ``--synth-iters``, ...) with its description
and default in ``--help``, and a new field becomes a flag without touching this module. Flags
override the fields of ``--recipe FILE`` (a recipe, or a ``manifest.json`` whose recipe is
reused), which override the defaults.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from d4c_core.errors import SpecError
from d4c_core.recipe import Cli, Recipe, field_metadata, parse_bits, walk_fields

_DEST = "recipe__"
# Fields that are not settings (the format version is implied by the code that runs).
_NOT_FLAGS = ("version",)


@dataclass(frozen=True)
class RecipeFlag:
    path: str  # dotted recipe path, e.g. calibration.synth.iters
    flags: tuple[str, ...]  # the flag first, then its aliases
    annotation: Any
    cli: Cli

    @property
    def dest(self) -> str:
        return _DEST + self.path.replace(".", "__")


def recipe_flags() -> list[RecipeFlag]:
    """One flag per recipe field, in declaration order."""
    out = []
    for path, model, name in walk_fields(Recipe):
        if path in _NOT_FLAGS:
            continue
        cli = field_metadata(model, name, Cli) or Cli()
        flag = cli.flag or "--" + name.replace("_", "-")
        out.append(RecipeFlag(path, (flag, *cli.aliases), model.model_fields[name].annotation, cli))
    return out


def _default(path: str) -> Any:
    value: Any = Recipe()
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _help(model_path: str, description: str | None) -> str:
    default = _default(model_path)
    if isinstance(default, tuple):
        default = ",".join(default) or "(none)"
    return f"{description or model_path} (default: {default}; recipe: {model_path})"


def _inner(annotation: Any) -> Any:
    """The type inside ``Annotated[...]`` (pydantic keeps it for list items)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _argument(flag: RecipeFlag, description: str | None) -> dict[str, Any]:
    """argparse keywords for ``flag``: type, choices or action from its annotation."""
    kw: dict[str, Any] = {
        "dest": flag.dest,
        "default": argparse.SUPPRESS,  # only given flags override
        "help": _help(flag.path, description),
    }
    ann = _inner(flag.annotation)
    origin = typing.get_origin(ann)
    if ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        kw["choices"] = list(typing.get_args(ann))
    elif origin is tuple:
        item = _inner(typing.get_args(ann)[0])
        if flag.cli.lines_file:  # read when the recipe is built: errors name the flag there
            kw["metavar"] = "FILE"
            kw["help"] += "; a file, one per line"
        elif choices := _literal_choices(item):
            kw["type"] = _comma_list
            kw["metavar"] = ",".join(choices)
        else:
            kw["type"] = _comma_list
            kw["metavar"] = "A,B,..."
    elif ann in (int, float):
        kw["type"] = ann
        kw["metavar"] = "N" if ann is int else "X"
    elif not (isinstance(ann, type) and issubclass(ann, str | types.NoneType)):
        raise TypeError(f"no command-line form for {flag.path}: {ann!r}")
    return kw


def _literal_choices(ann: Any) -> tuple[str, ...]:
    return typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else ()


def _lines(path: str) -> list[str]:
    from d4c_core.evaluate import read_lines

    return list(read_lines(Path(path)))


def _comma_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """``--recipe FILE``, ``--bits`` and one flag per recipe field, in a "recipe" group."""
    g = p.add_argument_group(
        "recipe", "job settings; flags override --recipe FILE, which overrides the defaults"
    )
    g.add_argument(
        "--recipe",
        metavar="FILE.json",
        help="a recipe as JSON, or an artifact's manifest.json (its recipe reproduces that job)",
    )
    bits = Recipe().quant.bits_name
    g.add_argument(
        "--bits",
        help=f"wXaY, X and Y in 2..8: --weight-bits and --act-bits at once (default: {bits})",
    )
    for flag in recipe_flags():
        path, _, name = flag.path.rpartition(".")
        model = _model_at(path)
        g.add_argument(*flag.flags, **_argument(flag, model.model_fields[name].description))


def _model_at(path: str) -> type[BaseModel]:
    model: type[BaseModel] = Recipe
    for part in filter(None, path.split(".")):
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model


def read_recipe_file(path: Path) -> dict[str, Any]:
    """A recipe JSON object from ``path``; a manifest's ``recipe`` member when given one."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise SpecError(f"--recipe {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise SpecError(f"--recipe {path}: not JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("recipe"), dict) and "model" in data:
        data = data["recipe"]
    if not isinstance(data, dict):
        raise SpecError(f"--recipe {path}: not a JSON object")
    return data


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe JSON the command line asks for: the file, then ``--bits``, then each flag.

    Only what was given is in it (a client sends just that; the server fills defaults).
    """
    data: dict[str, Any] = read_recipe_file(Path(args.recipe)) if args.recipe else {}
    if args.bits is not None:
        w, a = parse_bits(args.bits)
        _set(data, "quant.weight_bits", w)
        _set(data, "quant.act_bits", a)
    for flag in recipe_flags():
        if hasattr(args, flag.dest):
            value = getattr(args, flag.dest)
            if flag.cli.lines_file:
                try:
                    value = _lines(value)
                except SpecError as e:
                    raise SpecError(f"{flag.flags[0]}: {e}") from None
            _set(data, flag.path, value)
    return data


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The validated recipe; a bad value is a ``SpecError`` naming the flag(s) and the field."""
    try:
        return Recipe.from_dict(recipe_overrides(args))
    except SpecError as e:
        raise SpecError(_with_flags(e, args)) from None


def _with_flags(err: SpecError, args: argparse.Namespace) -> str:
    """Prefix the flags behind ``err.field``: the field's own, or the given ones below it."""
    field = err.field
    if field is None:
        return str(err)
    flags = recipe_flags()
    own = [f for f in flags if field == f.path or field.startswith(f.path + ".")]
    below = [f for f in flags if f.path.startswith(field + ".") and hasattr(args, f.dest)]
    named = own or below
    return f"{', '.join(f.flags[0] for f in named)}: {err}" if named else str(err)


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{part}: must be a JSON object")
        data = child
    data[leaf] = value

"""How a recipe field is declared and validated: the base every recipe part derives from,
the field metadata the CLI and the service read (``Cli``, ``Budget``), and errors by path.

``d4c_core.recipe`` declares the fields; this module is the machinery under them, so the
declarations read as a list of settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from d4c_core.errors import RecipeError, SpecError


@dataclass(frozen=True)
class Cli:
    """How a field appears on the command line when its generated flag would be unclear.

    ``flag`` replaces the generated ``--field-name``; ``aliases`` are older spellings kept
    working; ``lines_file``: a list field read from a file, one item per line.
    """

    flag: str | None = None
    aliases: tuple[str, ...] = ()
    lines_file: bool = False


@dataclass(frozen=True)
class Budget:
    """The field costs server time or memory: a deployment caps it with ``max_<name>``
    (a list field: its length). ``if_set``: only a value the client chose is held to the
    cap (search sizes whose defaults are sliced from an already budgeted set)."""

    name: str
    if_set: bool = False


def spec_error(err: ValidationError) -> RecipeError:
    """The first error of ``err`` as a ``RecipeError`` naming its field by dotted path."""
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    return RecipeError(f"{path or 'recipe'}: {msg}", field=path or None)


_VALIDATING: ContextVar[bool] = ContextVar("d4c_recipe_validating", default=False)


@contextmanager
def _outermost() -> Iterator[None]:
    token = _VALIDATING.set(True)
    try:
        yield
    except ValidationError as e:
        raise spec_error(e) from None
    finally:
        _VALIDATING.reset(token)


class RecipePart(BaseModel):
    """Frozen, strict, closed: a typo is an error, never a silently ignored default."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, validate_default=False
    )

    def __init__(self, **data: Any) -> None:
        # Nested parts are built inside their parent's validation: let pydantic collect the
        # error with its full path there; only the outermost call turns it into a SpecError.
        if _VALIDATING.get():
            super().__init__(**data)
        else:
            with _outermost():
                super().__init__(**data)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if not isinstance(data, dict):
            raise SpecError(f"{cls.__name__} must be a JSON object")
        with _outermost():
            return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except (json.JSONDecodeError, ValueError) as e:
            raise SpecError(f"recipe is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Self:
        """Nested replace: ``r.replace(seed=1, calibration={"synth": {"iters": 10}})``."""
        return type(self).from_dict(_merge(self.to_dict(), changes))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, BaseModel):
            v = v.model_dump()
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            v = _merge(out[k], v)
        out[k] = v
    return out


def field_metadata(model: type[BaseModel], name: str, kind: type) -> Any:
    """The ``kind`` (``Cli`` / ``Budget``) metadata of ``model.name``, else None."""
    return next((m for m in model.model_fields[name].metadata if isinstance(m, kind)), None)


def walk_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel], str]]:
    """Every leaf field below ``model`` as (dotted path, owning model, field name)."""
    out: list[tuple[str, type[BaseModel], str]] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, RecipePart):
            out += walk_fields(sub, path + ".")
        else:
            out.append((path, model, name))
    return out

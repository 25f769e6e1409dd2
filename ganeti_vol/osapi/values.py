"""Values of OS parameters: booleans, integers and lists as Ganeti passes them, and
:class:`OSParams`, the typed view of ``OSP_*``."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.ganeti import fields

log = logging.getLogger(__name__)



TRUE_WORDS = frozenset({"yes", "true", "on", "1"})
FALSE_WORDS = frozenset({"no", "false", "off", "0"})
BOOL_HINT = "use yes/no, true/false, on/off or 1/0"
SCRIPTS = ("create", "export", "import", "rename", "verify")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: default of the typed getters: an unset parameter is an error
REQUIRED: Any = _Required()


# --- values --------------------------------------------------------------------------------


def parse_bool(text: str, what: str) -> bool:
    """``yes/no, true/false, on/off, 1/0`` in any case; anything else is an error."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    shown = f"'{text}'" if text else "empty"
    raise E.OSDefinitionError(f"invalid {what}: {shown} is not a boolean ({BOOL_HINT})")


def parse_int(
    text: str, what: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """A whole number (optional sign) within ``[minimum, maximum]``."""
    try:
        value = int(text.strip(), 10)
    except ValueError:
        shown = f"'{text}'" if text else "empty"
        raise E.OSDefinitionError(f"invalid {what}: {shown} is not a whole number") from None
    if minimum is not None and value < minimum:
        raise E.OSDefinitionError(f"invalid {what}: {value} is less than {minimum}")
    if maximum is not None and value > maximum:
        raise E.OSDefinitionError(f"invalid {what}: {value} is more than {maximum}")
    return value


def split_list(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` except where backslash-escaped (``\\,`` and ``\\\\``).

    Items are stripped of surrounding whitespace and empty items dropped,
    so ``""`` is the empty list and ``"a, b\\,c"`` is ``["a", "b,c"]``.
    """
    if len(sep) != 1 or sep == "\\":
        raise E.ProgrammerError(f"list separator must be one character other than '\\\\': {sep!r}")
    return [item.strip() for item in fields.split_unescaped(text, sep) if item.strip()]


#: the type of a parameter for :meth:`OSParams.check`: a name, or the allowed values
ParamType = str | Sequence[str]


def param_usage(spec: Mapping[str, ParamType]) -> str:
    """Lines ``    name (type)`` for a usage text (choices shown as ``a|b|c``)."""
    return "".join(
        f"\n    {name} ({kind if isinstance(kind, str) else '|'.join(kind)})"
        for name, kind in spec.items()
    )


def param_key(name: str) -> str:
    """The canonical key of a parameter: lower case, ``-`` as ``_`` (as in ``OSP_<NAME>``)."""
    return name.strip().lower().replace("-", "_")


class OSParams(Mapping[str, str]):
    """The OS parameters (``OSP_*``), keyed by lower-case name, with typed getters.

    An unset parameter is absent; one set to ``""`` is present and empty.
    Each getter takes a ``default`` returned when the parameter is *unset*;
    without one an unset parameter is an error.  An *empty* value is an
    empty string (:meth:`get_str`), an empty list (:meth:`get_list`), and an
    error for booleans and numbers.  Errors are
    :class:`~ganeti_vol.core.errors.OSDefinitionError` naming the parameter.
    """

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = {param_key(k): str(v) for k, v in values.items()}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> OSParams:
        prefix = C.OSP_PREFIX
        return cls({k[len(prefix):]: v for k, v in environ.items() if k.startswith(prefix)})

    def __getitem__(self, name: str) -> str:
        return self._values[param_key(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and param_key(name) in self._values

    def __repr__(self) -> str:
        return f"OSParams({sorted(self._values)})"

    def is_set(self, name: str) -> bool:
        """True if the parameter was given, even as an empty string."""
        return name in self

    def _raw(self, name: str, default: Any) -> tuple[str | None, Any]:
        if name in self:
            return self[name], None
        if default is REQUIRED:
            key = param_key(name)
            raise E.OSDefinitionError(f"OS parameter '{key}' is required (give -O {key}=...)")
        return None, default

    @staticmethod
    def _what(name: str) -> str:
        return f"OS parameter '{param_key(name)}'"

    def get_str(self, name: str, default: Any = REQUIRED) -> str:
        """The value as given (``""`` when set but empty)."""
        value, fallback = self._raw(name, default)
        return fallback if value is None else value

    def get_bool(self, name: str, default: Any = REQUIRED) -> bool:
        """``yes/no, true/false, on/off, 1/0`` in any case (``"False"`` is False)."""
        value, fallback = self._raw(name, default)
        return fallback if value is None else parse_bool(value, self._what(name))

    def get_int(
        self,
        name: str,
        default: Any = REQUIRED,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value, fallback = self._raw(name, default)
        if value is None:
            return fallback  # type: ignore[no-any-return]
        return parse_int(value, self._what(name), minimum=minimum, maximum=maximum)

    def get_list(self, name: str, default: Any = REQUIRED, *, sep: str = ",") -> list[str]:
        """Items split on unescaped ``sep`` (see :func:`split_list`); empty value: ``[]``."""
        value, fallback = self._raw(name, default)
        return list(fallback) if value is None else split_list(value, sep)

    def get_choice(self, name: str, choices: Sequence[str], default: Any = REQUIRED) -> str:
        value, fallback = self._raw(name, default)
        if value is None:
            return fallback  # type: ignore[no-any-return]
        if value not in choices:
            raise E.OSDefinitionError(
                f"invalid {self._what(name)}: '{value}' is not one of {', '.join(choices)}"
            )
        return value

    def check(self, spec: Mapping[str, ParamType]) -> None:
        """Check every parameter against ``spec``: name -> ``"str"``, ``"bool"``,
        ``"int"``, ``"list"`` or a sequence of allowed values.  Unknown names
        and malformed values raise; unset parameters are fine."""
        self.check_known(list(spec))
        for name, kind in spec.items():
            if name not in self:
                continue
            if kind == "bool":
                self.get_bool(name)
            elif kind == "int":
                self.get_int(name)
            elif kind == "list":
                self.get_list(name)
            elif not isinstance(kind, str):
                self.get_choice(name, kind)
            elif kind != "str":
                raise E.ProgrammerError(f"unknown parameter type {kind!r} for '{name}'")

    def unknown(self, declared: Sequence[str]) -> list[str]:
        """Names given that are not in ``declared`` (parameters.list)."""
        known = {param_key(n) for n in declared}
        return [name for name in self if name not in known]

    def check_known(self, declared: Sequence[str]) -> None:
        extra = self.unknown(declared)
        if extra:
            raise E.OSDefinitionError(
                f"unknown OS parameter(s) {', '.join(extra)} "
                f"(known: {', '.join(param_key(n) for n in declared) or 'none'})"
            )

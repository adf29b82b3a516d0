"""xl.cfg domain configuration files: syntax, typed settings, validation.

pyxen reads the same configuration files as Xen's ``xl create`` so that
existing guest configs work unchanged.  There are two layers:

* :func:`parse_xl_cfg` implements the *syntax* of libxlu's config grammar
  (``KEY = VALUE`` / ``KEY += VALUE`` statements separated by newlines or
  ``;``, quoted strings, integers, nested ``[ ... ]`` lists, ``#``
  comments) and yields a :class:`RawConfig` that remembers where every
  setting came from.
* :func:`load_domain_config` interprets the keys pyxen implements into a
  :class:`DomainConfig`, validating values, resolving paths and
  collecting warnings for keys it ignores.

Nothing here prints, exits or lets an exception other than
:class:`ConfigError` escape for a user mistake: the CLI decides how to
show errors, and every message carries ``file:line`` so the user can fix
the right place.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Union
from urllib.parse import unquote

from .. import hostmem
from ..backends.vifmode import VifModeError, builtin_mode, nat_addresses, parse_ips
from ..hostmem import MAX_RAM_MIB
from .paths import domain_name_problem

__all__ = [
    "COMMAND_LINE",
    "DEFAULT_MEMORY_MIB",
    "MAX_LIST_DEPTH",
    "MAX_VCPUS",
    "Atom",
    "ConfigError",
    "DiskFormat",
    "DiskSpec",
    "DomainConfig",
    "NbdTarget",
    "Op",
    "RawConfig",
    "Setting",
    "ShutdownAction",
    "Value",
    "ValueList",
    "VifSpec",
    "build_domain_config",
    "load_domain_config",
    "parse_disk_spec",
    "parse_vif_rate",
    "parse_vif_spec",
    "check_vif_mode",
    "parse_xl_cfg",
    "parse_xl_number",
    "vdev_to_devid",
]

#: The pseudo file name of settings given as ``KEY=VALUE`` arguments.
COMMAND_LINE = "<command line>"

#: Memory (MiB) when neither ``memory`` nor ``maxmem`` is set.  (libxl's
#: own default is 32 MiB; 128 gives a modern PV kernel room to boot.)
DEFAULT_MEMORY_MIB = 128

#: Upper bound on vcpus/maxvcpus: a sanity limit against typos, far above
#: what a test guest needs but small enough not to exhaust the host.
MAX_VCPUS = 512

#: Upper bound on memory/maxmem in MiB (16 TiB), again against typos.
#: What a domain can really have is checked after parsing: at most
#: ``hostmem.MAX_RAM_MIB``, and memory no more than the host's
#: MemAvailable (:mod:`pyxen.hostmem`).
MAX_MEMORY_MIB = 1 << 24

#: vCPUs a domain may have until secondary vCPUs (``VCPUOP_up``) exist.
SUPPORTED_VCPUS = hostmem.SUPPORTED_VCPUS

#: How deep ``[ ... ]`` lists may nest.  xl's own configs nest at most
#: two deep; the bound keeps the recursive-descent parser (and every
#: recursive walk over a value) far from Python's recursion limit.
MAX_LIST_DEPTH = 64

_LONG_MIN = -(1 << 63)
_LONG_MAX = (1 << 63) - 1


class ConfigError(ValueError):
    """A configuration mistake, located as ``file:line: key: what``.

    ``line`` is ``None`` when there is no line to blame (e.g. a required
    key that is missing); ``key`` is ``None`` for pure syntax errors before
    a key is known.
    """

    def __init__(self, what: str, *, filename: str, line: int | None = None,
                 key: str | None = None) -> None:
        self.what = what
        self.filename = filename
        self.line = line
        self.key = key
        where = filename if line is None else f"{filename}:{line}"
        prefix = f"{key}: " if key else ""
        super().__init__(f"{where}: {prefix}{what}")


# --- values and settings ---------------------------------------------------------


@dataclass(frozen=True)
class Atom:
    """A scalar value.

    xl does not type values at parse time: ``64`` and ``"64"`` are both
    the text ``64`` and each key decides how to read it.  ``quoted``
    records which form was written, for messages and round-tripping.
    """

    text: str
    quoted: bool
    line: int
    #: File the value was written in, when it differs from its setting's
    #: (a file's list extended with ``+=`` on the command line).
    source: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ValueList:
    """A ``[ ... ]`` list; items may be atoms or (nested) lists."""

    items: tuple[Value, ...]
    line: int
    source: str | None = field(default=None, compare=False)


Value = Union[Atom, ValueList]  # noqa: UP007 (runtime alias, not annotation)


class Op(Enum):
    """How a statement combines with an earlier setting of the same key."""

    ASSIGN = "="
    APPEND = "+="


class _Chain:
    """The running concatenation of one key's ``+=`` statements.

    Concatenating at every statement would copy the whole value each time,
    so N appends would cost O(N²).  Instead the pieces are collected here
    (amortised O(1) per statement) and each :class:`Setting` of the chain
    remembers how many pieces were in the value when it was written; the
    joined value is built only when someone reads it.
    """

    __slots__ = ("is_list", "pieces")

    def __init__(self, first: Value) -> None:
        self.is_list = isinstance(first, ValueList)
        self.pieces: list[Value] = list(first.items) if isinstance(
            first, ValueList) else [first]

    def add(self, v: Value) -> int:
        """Append ``v``'s pieces; returns the chain length after it."""
        if isinstance(v, ValueList):
            self.pieces.extend(v.items)
        else:
            self.pieces.append(v)
        return len(self.pieces)


class Setting:
    """One statement, with its value after ``+=`` concatenation.

    ``source`` is the config file name or :data:`COMMAND_LINE`; ``line``
    is the line there (for command-line overrides: the argument's
    1-based position).  The value of a ``+=`` statement is the key's
    earlier value plus this statement's, joined when first read (see
    :class:`_Chain`).  Treat settings as read-only.
    """

    __slots__ = ("key", "op", "source", "line", "_value", "_chain",
                 "_upto", "_quoted", "_at")

    def __init__(self, key: str, value: Value, op: Op, source: str,
                 line: int, *, chain: _Chain | None = None, upto: int = 0,
                 quoted: bool = False) -> None:
        # ``value`` is the statement's own value; with ``chain`` the
        # setting's value is the first ``upto`` pieces of the chain.
        self.key = key
        self.op = op
        self.source = source
        self.line = line
        self._value: Value | None = None if chain is not None else value
        self._chain = chain
        self._upto = upto
        self._quoted = quoted
        self._at = value

    @property
    def value(self) -> Value:
        v = self._value
        if v is None:
            chain = self._chain
            assert chain is not None
            at = self._at
            pieces = chain.pieces[:self._upto]
            if chain.is_list:
                v = ValueList(tuple(pieces), at.line, at.source)
            else:
                text = "".join(p.text for p in pieces if isinstance(p, Atom))
                v = Atom(text, self._quoted, at.line, at.source)
            self._value = v
        return v

    def _chain_for_append(self) -> tuple[_Chain, bool]:
        """The chain a following ``+=`` extends, and its quoted flag."""
        if self._chain is not None and self._upto == len(self._chain.pieces):
            return self._chain, self._quoted
        v = self.value
        return _Chain(v), isinstance(v, Atom) and v.quoted

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Setting):
            return NotImplemented
        return (self.key, self.value, self.op, self.source, self.line) == (
            other.key, other.value, other.op, other.source, other.line)

    def __hash__(self) -> int:
        return hash((self.key, self.op, self.source, self.line))

    def __repr__(self) -> str:
        return (f"Setting(key={self.key!r}, value={self.value!r}, "
                f"op={self.op}, source={self.source!r}, line={self.line})")

    def error(self, what: str, at: Value | None = None) -> ConfigError:
        """A ConfigError blaming this setting, or one value inside it."""
        return ConfigError(what, filename=self.where_of(at)[0],
                           line=self.where_of(at)[1], key=self.key)

    def where_of(self, at: Value | None) -> tuple[str, int]:
        """(file, line) of a value inside this setting (or the setting)."""
        if at is None:
            return self.source, self.line
        return at.source or self.source, at.line

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _describe(v: Value) -> str:
    if isinstance(v, ValueList):
        return "a list"
    return f"'{v.text}'"


def parse_xl_number(text: str) -> int:
    """Read an integer the way xl does (C ``strtol(text, &end, 0)``).

    Decimal, ``0x`` hexadecimal or leading-``0`` octal (so ``010`` is 8,
    as documented in xl.cfg(5)), optional sign and leading whitespace,
    nothing after the digits, and within a signed 64-bit long.  Floats
    and unit suffixes are not numbers in xl.  Raises ``ValueError``.
    """
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)",
                     text)
    if not m or len(text) > 100:
        raise ValueError(text)
    digits = m.group(2)
    # Python's base 0 would reject C's leading-zero octal ("010" == 8).
    octal = len(digits) > 1 and digits[0] == "0" and digits[1] not in "xX"
    v = int(digits[1:], 8) if octal else int(digits, 0)
    if m.group(1) == "-":
        v = -v
    if not _LONG_MIN <= v <= _LONG_MAX:
        raise ValueError(text)
    return v


@dataclass
class RawConfig:
    """Every statement of a config file (plus overrides), in order.

    Later settings of a key override earlier ones, as in xl; ``+=``
    statements have already been concatenated with the earlier value.
    The typed getters below are what later pyxen features should use to
    read keys that :class:`DomainConfig` does not interpret yet: they
    produce properly located :class:`ConfigError` messages.
    """

    filename: str
    settings: list[Setting] = field(default_factory=list)
    #: key -> its effective (last) setting, in first-appearance order.
    #: Kept by :meth:`apply`, so that a lookup does not scan every
    #: earlier statement (which made N keys cost O(N²)).
    _last: dict[str, Setting] = field(default_factory=dict, init=False,
                                      repr=False, compare=False)

    def __post_init__(self) -> None:
        for s in self.settings:
            self._last[s.key] = s

    def apply(self, key: str, op: Op, value: Value, source: str,
              line: int) -> Setting:
        """Record one statement, implementing ``+=`` like libxlu.

        ``+=`` concatenates strings or lists with the previous value of
        the key (it is a plain assignment when there is none); mixing a
        string and a list is an error.  Constant work per statement
        (plus the size of ``value``): see :class:`_Chain`.  Add settings
        only through here, so that :meth:`get` stays in step.
        """
        prev = self._last.get(key)
        s: Setting
        if op is Op.APPEND and prev is not None:
            chain, quoted = prev._chain_for_append()
            if chain.is_list != isinstance(value, ValueList):
                raise ConfigError(
                    "can't add [list] to \"string\" or vice versa "
                    f"(previous value at {prev.where})",
                    filename=source, line=line, key=key)
            if isinstance(value, ValueList):
                at: Value = ValueList((), value.line, source)
            else:
                quoted = quoted or value.quoted
                at = Atom("", quoted, value.line, source)
            s = Setting(key, at, op, source, line, chain=chain,
                        upto=chain.add(value), quoted=quoted)
        else:
            s = Setting(key, value, op, source, line)
        self.settings.append(s)
        self._last[key] = s
        return s

    def get(self, key: str) -> Setting | None:
        """The effective (last) setting of ``key``, or None."""
        return self._last.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._last

    def keys(self) -> list[str]:
        """Keys in order of first appearance."""
        return list(self._last)

    def effective(self) -> dict[str, Setting]:
        """Map of key -> effective setting, in first-appearance order."""
        return dict(self._last)

    # -- typed getters -------------------------------------------------------

    def get_string(self, key: str) -> str | None:
        """A scalar as text (numbers are text too, as in xl)."""
        s = self.get(key)
        if s is None:
            return None
        if not isinstance(s.value, Atom):
            raise s.error("expected a string, got a list")
        return s.value.text

    def get_int(self, key: str, *, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        """A scalar read as an xl number, optionally range-checked."""
        s = self.get(key)
        if s is None:
            return None
        if not isinstance(s.value, Atom):
            raise s.error("expected a number, got a list")
        if s.op is Op.APPEND:
            raise s.error("can't use += with numbers")
        try:
            v = parse_xl_number(s.value.text)
        except ValueError:
            hint = ""
            if re.fullmatch(r"\s*[0-9]*\.[0-9]+\s*", s.value.text):
                hint = " (xl numbers are integers)"
            raise s.error(f"expected a number, got '{s.value.text}'{hint}"
                          ) from None
        if minimum is not None and v < minimum:
            raise s.error(f"must be at least {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise s.error(f"must be at most {maximum}, got {v}")
        return v

    def get_bool(self, key: str) -> bool | None:
        """An xl BOOLEAN: a number, 0 is false and anything else true."""
        s = self.get(key)
        if s is None:
            return None
        if isinstance(s.value, Atom):
            try:
                return parse_xl_number(s.value.text) != 0
            except ValueError:
                pass
        raise s.error(f"expected a boolean (0 or 1), got {_describe(s.value)}")

    def get_list(self, key: str) -> list[Atom] | None:
        """A list of scalars (nested lists are an error)."""
        s = self.get(key)
        if s is None:
            return None
        if not isinstance(s.value, ValueList):
            raise s.error(f"expected a list like [ \"...\", ... ], got a "
                          f"single value {_describe(s.value)}")
        out = []
        for i, item in enumerate(s.value.items, 1):
            if not isinstance(item, Atom):
                raise s.error(f"element {i} is a list, expected a string",
                              item)
            out.append(item)
        return out

    def get_string_list(self, key: str) -> list[str] | None:
        """A list of scalars as plain strings."""
        items = self.get_list(key)
        return None if items is None else [a.text for a in items]


# --- lexer -----------------------------------------------------------------------

_IDENT_START = re.compile(r"[A-Za-z_]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_]*")
_SIMPLE_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b",
                   "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # IDENT NUMBER STRING NEWLINE EOF , [ ] = += ;
    text: str
    line: int

    def describe(self) -> str:
        if self.kind == "IDENT":
            return f"'{self.text}'"
        if self.kind == "NUMBER":
            return f"number '{self.text}'"
        if self.kind == "STRING":
            return "a string"
        if self.kind == "NEWLINE":
            return "end of line"
        if self.kind == "EOF":
            return "end of input"
        return f"'{self.kind}'"


class _Lexer:
    """Tokeniser for libxlu's lexical syntax.

    Deviations, all towards accepting more: keys may contain upper-case
    letters; ``\\r`` is whitespace (CRLF files); a trailing comment needs
    no final newline; ``\\xHH`` and ``\\ooo`` escapes work as in C (xl's
    implementation of them is broken); a number token runs over letters
    so that ``64M`` is reported as a bad number, not a lexical error.
    """

    def __init__(self, text: str, source: str, fixed_line: int | None) -> None:
        self.text = text
        self.source = source
        self.fixed_line = fixed_line
        self.pos = 0
        self.line = 1

    def error(self, what: str, key: str | None = None) -> ConfigError:
        return ConfigError(what, filename=self.source, line=self._line(),
                           key=key)

    def _line(self) -> int:
        return self.fixed_line if self.fixed_line is not None else self.line

    def tokens(self) -> Iterator[_Tok]:
        text = self.text
        n = len(text)
        while self.pos < n:
            c = text[self.pos]
            if c in " \t\r\f\v":
                self.pos += 1
            elif c == "\n":
                yield _Tok("NEWLINE", "\n", self._line())
                self.pos += 1
                self.line += 1
            elif c == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            elif _IDENT_START.match(c):
                m = _IDENT.match(text, self.pos)
                assert m
                yield _Tok("IDENT", m.group(), self._line())
                self.pos = m.end()
            elif c.isdigit() and c.isascii():
                m = _NUMBER.match(text, self.pos)
                assert m
                self.pos = m.end()
                if text.startswith(".", self.pos):
                    raise self.error(
                        f"floating-point number '{m.group()}.…' is not "
                        "supported (xl numbers are integers)")
                yield _Tok("NUMBER", m.group(), self._line())
            elif c in "'\"":
                yield _Tok("STRING", self._string(c), self._line())
            elif c in ",[]=;":
                yield _Tok(c, c, self._line())
                self.pos += 1
            elif c == "+" and text.startswith("+=", self.pos):
                yield _Tok("+=", "+=", self._line())
                self.pos += 2
            else:
                hint = ""
                if c == "-" and text[self.pos + 1:self.pos + 2].isdigit():
                    hint = ": negative numbers must be quoted (\"-1\")"
                elif c in "+-.():{}":
                    hint = (" (xl config files are not Python: values are "
                            "quoted strings, integers and [lists])")
                raise self.error(f"unexpected character {c!r}{hint}")
        yield _Tok("EOF", "", self._line())

    def _string(self, quote: str) -> str:
        text = self.text
        start_line = self._line()
        i = self.pos + 1
        out: list[str] = []
        while True:
            if i >= len(text) or text[i] == "\n":
                raise ConfigError(
                    "unterminated string (strings cannot span lines)",
                    filename=self.source, line=start_line)
            c = text[i]
            if c == quote:
                self.pos = i + 1
                return "".join(out)
            if c != "\\":
                out.append(c)
                i += 1
                continue
            if i + 1 >= len(text) or text[i + 1] == "\n":
                raise ConfigError(
                    "unterminated string (strings cannot span lines)",
                    filename=self.source, line=start_line)
            e = text[i + 1]
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                i += 2
            elif e == "x":
                m = re.compile(r"[0-9a-fA-F]{2}").match(text, i + 2)
                if not m:
                    raise self.error("\\x in a string must be followed by "
                                     "two hex digits")
                out.append(chr(int(m.group(), 16)))
                i = m.end()
            elif e in "01234567":
                m = re.compile(r"[0-7]{1,3}").match(text, i + 1)
                assert m
                out.append(chr(int(m.group(), 8)))
                i = m.end()
            else:
                raise self.error(f"invalid escape '\\{e}' in a string")


# --- parser ----------------------------------------------------------------------


class _Parser:
    """Recursive-descent parser for libxlu's grammar (libxlu_cfg_y.y).

    file: (assignment? (NEWLINE | ';'))* assignment?
    assignment: IDENT ('=' | '+=') value
    value: atom | '[' NL* (value NL* (',' NL* value NL*)* (',' NL*)?)? ']'
    """

    def __init__(self, lexer: _Lexer, into: RawConfig) -> None:
        self.lexer = lexer
        self.toks = lexer.tokens()
        self.tok = next(self.toks)
        self.into = into
        self._last_key: str | None = None
        self._depth = 0  # lists open around the current token

    def advance(self) -> _Tok:
        t = self.tok
        self.tok = next(self.toks)
        return t

    def error(self, what: str, key: str | None = None,
              line: int | None = None) -> ConfigError:
        return ConfigError(what, filename=self.lexer.source,
                           line=self.tok.line if line is None else line,
                           key=key)

    def parse(self) -> None:
        while self.tok.kind != "EOF":
            if self.tok.kind in ("NEWLINE", ";"):
                self.advance()
                continue
            if self.tok.kind != "IDENT":
                raise self.error(f"expected a setting (KEY = VALUE), found "
                                 f"{self.tok.describe()}")
            self.assignment()
            if self.tok.kind not in ("NEWLINE", ";", "EOF"):
                raise self.error(
                    f"unexpected {self.tok.describe()} after the value (put "
                    "one setting per line, or separate them with ';')",
                    key=self._last_key)

    def assignment(self) -> None:
        key_tok = self.advance()
        key = key_tok.text
        self._last_key = key
        if self.tok.kind == "=":
            op = Op.ASSIGN
        elif self.tok.kind == "+=":
            op = Op.APPEND
        else:
            raise self.error(f"expected '=' after the key, found "
                             f"{self.tok.describe()}", key=key)
        self.advance()
        value = self.value(key)
        self.into.apply(key, op, value, self.lexer.source, key_tok.line)

    def value(self, key: str) -> Value:
        t = self.tok
        if t.kind in ("NUMBER", "STRING"):
            self.advance()
            return Atom(t.text, t.kind == "STRING", t.line, self.lexer.source)
        if t.kind == "[":
            return self.list_value(key)
        if t.kind == "IDENT":
            shell = ""
            if self.lexer.source == COMMAND_LINE:
                shell = f" (in a shell: '{key}=\"{t.text}\"')"
            raise self.error(f"bare word '{t.text}' is not a value; strings "
                             f"must be quoted: {key} = \"{t.text}\"{shell}",
                             key=key)
        if t.kind in ("NEWLINE", "EOF", ";"):
            raise self.error("missing value", key=key)
        raise self.error(f"expected a value (number, \"string\" or [list]), "
                         f"found {t.describe()}", key=key)

    def _skip_newlines(self) -> None:
        while self.tok.kind == "NEWLINE":
            self.advance()

    def list_value(self, key: str) -> ValueList:
        if self._depth >= MAX_LIST_DEPTH:
            raise self.error(f"lists nested more than {MAX_LIST_DEPTH} "
                             "deep", key=key)
        self._depth += 1
        try:
            return self._list_items(key)
        finally:
            self._depth -= 1

    def _list_items(self, key: str) -> ValueList:
        open_tok = self.advance()
        items: list[Value] = []
        self._skip_newlines()
        while True:
            if self.tok.kind == "]":
                self.advance()
                return ValueList(tuple(items), open_tok.line, self.lexer.source)
            if self.tok.kind == "EOF":
                raise self.error(f"unterminated list (no ']' for the '[' on "
                                 f"line {open_tok.line})", key=key)
            if self.tok.kind == ",":
                raise self.error("empty list element", key=key)
            items.append(self.value(key))
            self._skip_newlines()
            if self.tok.kind == ",":
                self.advance()
                self._skip_newlines()
            elif self.tok.kind != "]":
                if self.tok.kind == "EOF":
                    continue  # reported as unterminated above
                raise self.error(f"expected ',' or ']' in list, found "
                                 f"{self.tok.describe()}", key=key)


def parse_xl_cfg(text: str, filename: str, *, into: RawConfig | None = None,
                 line: int | None = None) -> RawConfig:
    """Parse xl.cfg text into a :class:`RawConfig`.

    ``filename`` is used for messages and recorded as each setting's
    source.  To layer more settings on top of an existing config (e.g.
    command-line overrides) pass it as ``into``; ``line`` then pins every
    setting's line number (used for the argument index of overrides).
    Raises :class:`ConfigError` on the first syntax error.
    """
    raw = into if into is not None else RawConfig(filename)
    text = text.removeprefix("\ufeff")
    _Parser(_Lexer(text, filename, line), raw).parse()
    return raw


# --- structured values -----------------------------------------------------------


class ShutdownAction(Enum):
    """What to do when a domain stops (xl's ``on_*`` actions)."""

    DESTROY = "destroy"
    RESTART = "restart"
    RENAME_RESTART = "rename-restart"
    PRESERVE = "preserve"
    COREDUMP_DESTROY = "coredump-destroy"
    COREDUMP_RESTART = "coredump-restart"
    SOFT_RESET = "soft-reset"


_ACTION_DEFAULTS = {
    "on_poweroff": ShutdownAction.DESTROY,
    "on_reboot": ShutdownAction.RESTART,
    "on_crash": ShutdownAction.DESTROY,
    "on_watchdog": ShutdownAction.DESTROY,
    "on_soft_reset": ShutdownAction.SOFT_RESET,
}


class DiskFormat(Enum):
    """Image formats xl's disk syntax knows (``EMPTY``: empty CD-ROM)."""

    RAW = "raw"
    QCOW = "qcow"
    QCOW2 = "qcow2"
    VHD = "vhd"
    QED = "qed"
    EMPTY = "empty"


#: Formats pyxen's disk backend can serve.
SUPPORTED_DISK_FORMATS = frozenset({DiskFormat.RAW, DiskFormat.QCOW2,
                                    DiskFormat.EMPTY})


@dataclass(frozen=True)
class NbdTarget:
    """An ``nbd://host[:port]/export`` disk target, split up."""

    host: str
    port: int
    export: str


@dataclass(frozen=True)
class DiskSpec:
    """One ``disk=[...]`` entry (xl-disk-configuration(5) syntax).

    ``target`` is the string as written (``None`` for an empty CD-ROM);
    ``path`` is a local file path resolved like ``kernel`` (``None`` for
    NBD or script targets); ``devid`` is the xenstore VBD number of
    ``vdev`` (xen-vbd-interface(7)).
    """

    spec: str
    vdev: str
    devid: int
    target: str | None
    format: DiskFormat
    readwrite: bool
    cdrom: bool
    backend: str | None = None
    backendtype: str | None = None
    script: str | None = None
    specification: str | None = None
    direct_io_safe: bool = False
    discard: bool | None = None
    trusted: bool | None = None
    grant_usage: bool | None = None
    colo: dict[str, str] = field(default_factory=dict)
    nbd: NbdTarget | None = None
    path: Path | None = None


@dataclass(frozen=True)
class VifSpec:
    """One ``vif=[...]`` entry: comma-separated ``key=value`` options.

    ``options`` keeps every option as written (flags map to ``""``); the
    common ones are also exposed as typed fields.  ``mac`` is normalised
    to lower-case ``aa:bb:cc:dd:ee:ff``.
    """

    spec: str
    options: dict[str, str]
    mac: str | None = None
    bridge: str | None = None
    ip: str | None = None
    model: str | None = None
    type: str | None = None
    mtu: int | None = None
    #: the device number (``devid=`` or the vif's place among the config's vifs)
    devid: int | None = None


@dataclass
class DomainConfig:
    """A validated PV domain configuration.

    Memory sizes are MiB.  ``raw`` keeps every setting so that features
    added later can read keys this class does not interpret yet.
    """

    name: str
    kernel: Path
    memory: int
    maxmem: int
    vcpus: int
    maxvcpus: int
    raw: RawConfig = field(repr=False)
    uuid: uuidlib.UUID | None = None
    type: str = "pv"
    ramdisk: Path | None = None
    cmdline: str = ""
    on_poweroff: ShutdownAction = ShutdownAction.DESTROY
    on_reboot: ShutdownAction = ShutdownAction.RESTART
    on_crash: ShutdownAction = ShutdownAction.DESTROY
    on_watchdog: ShutdownAction = ShutdownAction.DESTROY
    on_soft_reset: ShutdownAction = ShutdownAction.SOFT_RESET
    disks: list[DiskSpec] = field(default_factory=list)
    vifs: list[VifSpec] = field(default_factory=list)
    cpus: str | list[str] | None = None
    cpu_weight: int | None = None
    cap: int | None = None
    localtime: bool = False
    seclabel: str | None = None
    #: The config file as given to load_domain_config (None if built from
    #: text).
    source: Path | None = None


# --- disk specs ------------------------------------------------------------------

_FORMAT_PREFIXES = ("raw", "qcow", "qcow2", "vhd")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_IGNORED_PREFIXES = ("tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy")
_PREFIX_RE = re.compile(r"([a-z][a-z0-9]*):")
_DISK_FLAGS = frozenset({"cdrom", "direct-io-safe", "discard", "no-discard",
                         "colo", "no-colo", "trusted", "untrusted"})
_DISK_COLO_KEYS = frozenset({"colo-host", "colo-port", "colo-export",
                             "active-disk", "hidden-disk"})


class _DiskBuilder:
    """State of xl's disk-spec lexer (libxlu_disk_l.l), in Python."""

    def __init__(self) -> None:
        self.target: str | None = None
        self.format: DiskFormat | None = None
        self.vdev: str | None = None
        self.readwrite: bool | None = None
        self.cdrom: bool | None = None
        self.backend: str | None = None
        self.backendtype: str | None = None
        self.script: str | None = None
        self.specification: str | None = None
        self.direct_io_safe = False
        self.discard: bool | None = None
        self.trusted: bool | None = None
        self.grant_usage: bool | None = None
        self.colo: dict[str, str] = {}
        self.had_prefix = False
        self.access_set = False

    def set_format(self, s: str) -> None:
        try:
            fmt = DiskFormat(s or "raw")
        except ValueError:
            raise ValueError(f"unknown disk format '{s}' (xl knows raw, "
                             "qcow, qcow2, vhd, qed)") from None
        if self.format is not None and self.format is not fmt:
            raise ValueError(f"format respecified ('{s}' after "
                             f"'{self.format.value}')")
        self.format = fmt

    def set_access(self, s: str) -> None:
        if s in ("r", "ro"):
            self.readwrite = False
        elif s in ("w", "rw", ""):
            self.readwrite = True
        else:
            raise ValueError(f"unknown access mode '{s}' (use r, ro, w or rw)")

    def set_string(self, what: str, s: str) -> None:
        old = getattr(self, what)
        if old:  # xl does not complain about overwriting empty strings
            raise ValueError(f"{what} respecified ('{s}' after '{old}')")
        setattr(self, what, s)

    def vdev_and_devtype(self, s: str) -> bool:
        """Handle a deprecated positional ``vdev:devtype``."""
        if ":" not in s:
            return False
        vdev, _, devtype = s.rpartition(":")
        self.set_string("vdev", vdev)
        if devtype == "cdrom":
            self.cdrom = True
        elif devtype == "disk":
            self.cdrom = False
        else:
            raise ValueError(f"unknown device type '{devtype}' in '{s}' "
                             "(use cdrom or disk)")
        return True

    def positional(self, s: str) -> None:
        if self.target is None:
            self.target = s
        elif not self.had_prefix and self.format is None:
            if self.target == "" and self.vdev_and_devtype(s):
                self.format = DiskFormat.EMPTY
            else:
                self.set_format(s)
        elif self.vdev is None:
            if not self.vdev_and_devtype(s):
                self.set_string("vdev", s)
        elif not self.access_set:
            self.access_set = True
            self.set_access(s)
        else:
            raise ValueError(f"too many positional parameters at '{s}'")

    def keyword(self, key: str, value: str) -> None:
        if key == "format":
            self.set_format(value)
        elif key == "devtype":
            if value not in ("cdrom", "disk"):
                raise ValueError(f"unknown devtype '{value}' (use cdrom or "
                                 "disk)")
            self.cdrom = value == "cdrom"
        elif key in ("access", "mode"):
            self.set_access(value)
        elif key == "backend":
            self.set_string("backend", value)
        elif key == "backendtype":
            if value not in ("phy", "tap", "qdisk", "standalone"):
                raise ValueError(f"unknown backendtype '{value}' (xl knows "
                                 "phy, tap, qdisk, standalone)")
            self.backendtype = value
        elif key == "specification":
            if value not in ("xen", "virtio"):
                raise ValueError(f"unknown specification '{value}' (use xen "
                                 "or virtio)")
            self.specification = value
        elif key == "vdev":
            self.set_string("vdev", value)
        elif key == "script":
            self.set_string("script", value)
        elif key == "grant_usage" and value in ("0", "1"):
            self.grant_usage = value == "1"
        elif key in _DISK_COLO_KEYS:
            if key == "colo-port" and not value.isdigit():
                raise ValueError(f"bad colo-port '{value}'")
            self.colo[key] = value
        else:
            raise ValueError(f"unknown parameter '{key}={value}'")

    def flag(self, f: str) -> None:
        if f == "cdrom":
            self.cdrom = True
        elif f == "direct-io-safe":
            self.direct_io_safe = True
        elif f in ("discard", "no-discard"):
            self.discard = f == "discard"
        elif f in ("colo", "no-colo"):
            self.colo["colo"] = "1" if f == "colo" else "0"
        else:
            self.trusted = f == "trusted"

    def prefix(self, name: str) -> None:
        self.had_prefix = True
        if name in _FORMAT_PREFIXES:
            self.set_format(name)
        elif name in _SCRIPT_PREFIXES:
            self.set_string("script", f"block-{name}")


def parse_nbd_url(url: str) -> NbdTarget:
    """Split ``nbd://host[:port][/export]`` (IPv6 hosts in brackets)."""
    m = re.fullmatch(r"nbd://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+)(?::([0-9]+))?"
                     r"(?:/(.*))?", url)
    if not m:
        raise ValueError(f"bad NBD URL '{url}' (expected "
                         "nbd://host[:port]/export)")
    host = m.group(1).strip("[]")
    port = int(m.group(2)) if m.group(2) else 10809
    if not 0 < port < 65536:
        raise ValueError(f"bad NBD port {port} in '{url}'")
    return NbdTarget(host, port, unquote(m.group(3) or ""))


def vdev_to_devid(vdev: str) -> int:
    """The xenstore VBD number for a vdev name (xen-vbd-interface(7)).

    Accepts ``xvdX[N]``, ``sdX[N]``, ``hdX[N]``, ``dN[pM]`` and a bare
    number (passed through).  Raises ``ValueError`` for names the
    encoding cannot represent.
    """
    if re.fullmatch(r"[0-9]\w*", vdev):
        try:
            n = parse_xl_number(vdev)
        except ValueError:
            raise ValueError(f"bad vdev '{vdev}'") from None
        if not 0 <= n < 1 << 31:
            raise ValueError(f"vdev number {n} out of range")
        return n
    m = re.fullmatch(r"(xvd|sd|hd)([a-z]+)([0-9]*)", vdev)
    if m:
        kind, letters, part_s = m.groups()
        disk = 0
        for ch in letters:
            disk = disk * 26 + (ord(ch) - ord("a") + 1)
        disk -= 1
    else:
        m = re.fullmatch(r"d([0-9]+)(?:p([0-9]+))?", vdev)
        if not m:
            raise ValueError(f"bad vdev '{vdev}' (use xvda, xvdb1, sda, hdc "
                             "or d0p1)")
        kind, disk, part_s = "xvd", int(m.group(1)), m.group(2) or ""
    part = int(part_s) if part_s else 0
    if kind == "xvd":
        if disk < 16 and part < 16:
            return 202 << 8 | disk << 4 | part
        if disk < 1 << 20 and part < 256:
            return 1 << 28 | disk << 8 | part
    elif kind == "sd":
        if disk < 16 and part < 16:
            return 8 << 8 | disk << 4 | part
    elif part < 64:
        if disk < 2:
            return 3 << 8 | disk << 6 | part
        if disk < 4:
            return 22 << 8 | (disk - 2) << 6 | part
    raise ValueError(f"vdev '{vdev}' is out of range for its device type")


def parse_disk_spec(spec: str) -> DiskSpec:
    """Parse one DISKSPEC string as xl does; raises ``ValueError``.

    Handles keywords, flags, positional ``target,format,vdev,access``,
    ``target=`` (which swallows the rest, commas included) and the
    deprecated ``prefix:`` syntax (``phy:``, ``file:``, ``raw:``,
    ``tap:aio:`` ...).  ``nbd://`` targets are URLs, not the deprecated
    ``nbd:`` script prefix.  The returned ``path`` is not resolved yet.
    """
    b = _DiskBuilder()
    pos = 0
    n = len(spec)
    while pos < n:
        while pos < n and spec[pos] in " \t\n":
            pos += 1
        if pos >= n:
            break
        rest = spec[pos:]
        if rest.startswith("target="):
            value = rest[len("target="):]
            value = value.removesuffix(",")
            b.set_string("target", value)
            break
        m = _PREFIX_RE.match(rest)
        is_url = rest.startswith("nbd://")
        if m and not is_url:
            name = m.group(1)
            after = rest[m.end():m.end() + 1]
            if name in _FORMAT_PREFIXES + _SCRIPT_PREFIXES + _IGNORED_PREFIXES:
                b.prefix(name)
                pos += m.end()
                continue
            if not after or not (after.isascii() and after.isalnum()):
                raise ValueError(f"unknown deprecated disk prefix '{name}:'")
        comma = spec.find(",", pos)
        end = n if comma < 0 else comma
        token = spec[pos:end]
        pos = end + 1
        if "=" in token:
            key, _, value = token.partition("=")
            b.keyword(key.strip(), value.strip())
        elif token.strip() in _DISK_FLAGS:
            b.flag(token.strip())
        else:
            b.positional(token.rstrip())
    if not b.vdev:
        raise ValueError("no vdev specified (e.g. vdev=xvda)")
    devid = vdev_to_devid(b.vdev)
    cdrom = bool(b.cdrom)
    target = b.target if b.target else None
    fmt = b.format or DiskFormat.RAW
    if target is None:
        if not cdrom:
            raise ValueError("no target specified (only an empty CD-ROM may "
                             "omit it)")
        fmt = DiskFormat.EMPTY
    # libxlu forces CD-ROMs read-only whatever the access parameter says.
    readwrite = False if cdrom else b.readwrite is not False
    nbd = None
    if target is not None and target.startswith("nbd://"):
        nbd = parse_nbd_url(target)
    return DiskSpec(spec=spec, vdev=b.vdev, devid=devid, target=target,
                    format=fmt, readwrite=readwrite, cdrom=cdrom,
                    backend=b.backend, backendtype=b.backendtype,
                    script=b.script, specification=b.specification,
                    direct_io_safe=b.direct_io_safe, discard=b.discard,
                    trusted=b.trusted, grant_usage=b.grant_usage,
                    colo=dict(b.colo), nbd=nbd)


# --- vif specs -------------------------------------------------------------------

_VIF_KEYS = frozenset({
    "type", "mac", "bridge", "netdev", "gatewaydev", "ip", "script",
    "backend", "vifname", "model", "rate", "forwarddev", "accel", "devid",
    "mtu", "vlan",
})
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.+-]{1,15}")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}")


_RATE_RE = re.compile(r"[0-9]+[GMK]?[Bb]/s")
_INTERVAL_RE = re.compile(r"[0-9]+[mu]?s?")


def _strtoull0(text: str) -> tuple[int, str]:
    """strtoull(text, &end, 0) on a string of digits and letters: octal after a
    leading 0; the value and what follows it."""
    digits = "01234567" if text.startswith("0") else "0123456789"
    i = 0
    while i < len(text) and text[i] in digits:
        i += 1
    return (int(text[:i], 8 if digits == "01234567" else 10) if i else 0), text[i:]


def parse_vif_rate(rate: str) -> tuple[int, int]:
    """xl's ``rate=RATE[@INTERVAL]`` (libxlu_vif.c): RATE is digits, an optional
    G/M/K (powers of 1000) and B/s or b/s (bits: divided by 8); INTERVAL is
    digits with s (the default), ms or us, 50 ms if absent.  Returns
    (bytes per interval, interval in microseconds), what libxl writes to the
    backend's ``rate`` node; bad text raises ValueError with xl's words."""
    text, at, interval = rate.partition("@")
    if not text:
        raise ValueError(f"no rate specified in '{rate}'")
    if not _RATE_RE.fullmatch(text):
        raise ValueError(f"invalid rate in '{text}'")
    bps, rest = _strtoull0(text)
    if bps == 0 or bps > 0xFFFFFFFF:
        raise ValueError(f"rate overflow in '{text}'")
    bps *= {"G": 10**9, "M": 10**6, "K": 10**3}.get(rest[:1], 1)
    if rest[:1] == "b" or rest[1:2] == "b":
        bps //= 8
    usecs = 50_000
    if at:
        if not _INTERVAL_RE.fullmatch(interval):
            raise ValueError(f"invalid replenishment interval in '{interval}'")
        n, rest = _strtoull0(interval)
        if n == 0 or n > 0xFFFFFFFF:
            raise ValueError(f"replenishment interval overflow in '{interval}'")
        if rest[:1] in ("s", ""):
            n *= 10**6
        elif rest[:1] == "m":
            n *= 1000
        if n > 0xFFFFFFFF:
            raise ValueError(f"replenishment interval overflow in '{interval}'")
        usecs = n
    if bps > (2**64 - 1) // usecs:
        raise ValueError(f"rate overflow in '{rate}'")
    return bps * usecs // 1_000_000, usecs


#: where libxl looks for a hotplug script named without a directory (XEN_SCRIPT_DIR)
XEN_SCRIPT_DIR = "/etc/xen/scripts"
#: the script libxl runs by default: pyxen's netback does its work itself (bridge mode)
DEFAULT_VIF_SCRIPT = "vif-bridge"


def vif_script_path(script: str) -> str:
    """The hotplug script pyxen runs for ``script=`` (its absolute path), or ""
    for none.  As libxl (libxl__device_nic_setdefault): a name without a
    leading '/' is in XEN_SCRIPT_DIR.  Xen's default ``vif-bridge``, when no
    such file is installed, is pyxen's own bridge mode: "" (so xl configs that
    name it keep working).  Xen's ``vif-route`` and ``vif-nat`` keep their
    path (the backend's ``script`` node holds it, as libxl writes it); when no
    such script is installed netback does their work itself
    (``vifmode.builtin_mode``)."""
    if not script:
        return ""
    path = script if script.startswith("/") else os.path.join(XEN_SCRIPT_DIR, script)
    if os.path.basename(path) == DEFAULT_VIF_SCRIPT and not os.path.exists(path):
        return ""
    return path


def check_vif_script(script: str) -> str:
    """``vif_script_path`` of ``script=``, checked: an executable file (ValueError
    naming it otherwise, so that a config load says which line is wrong)."""
    path = vif_script_path(script)
    if path and builtin_mode(path):
        return path  # Xen's vif-route/vif-nat, not installed: pyxen's own route/NAT mode
    if path and not os.path.isfile(path):
        raise ValueError(f"script '{script}': no such file ({path})")
    if path and not os.access(path, os.X_OK):
        raise ValueError(f"script '{script}': {path} is not executable")
    return path


def check_vif_mode(v: VifSpec, devid: int) -> str | None:
    """The mode pyxen sets up itself for a vif that names Xen's ``vif-route``
    or ``vif-nat`` (not installed), checked (ValueError naming the field):
    route needs ``ip=`` (the addresses routed to the guest), both route IPv4
    only, and NAT's guest and router addresses must exist (vif-nat's rule).
    None: bridge mode or a script of the user's own."""
    mode = builtin_mode(vif_script_path(v.options.get("script", "")))
    if mode is None:
        return None
    try:
        parse_ips(v.ip or "")
        if mode == "route" and not (v.ip or "").split():
            raise ValueError("ip: route mode (vif-route) needs ip= (the guest's IPv4 "
                             "addresses or networks to route to it)")
        if mode == "nat":
            nat_addresses(0, devid, v.ip or "")
    except VifModeError as e:
        raise ValueError(f"ip: {e}") from None
    return mode


def parse_vif_spec(spec: str) -> tuple[VifSpec, list[str]]:
    """Parse one NET_SPEC_STRING; returns (spec, warnings about it).

    Options are ``key=value`` separated by commas, leading blanks ignored,
    later duplicates win (as in xl).  Unknown options are warnings, like
    xl's "unrecognized argument"; bad values raise ``ValueError``.
    """
    opts: dict[str, str] = {}
    warnings: list[str] = []
    for token in spec.split(","):
        token = token.lstrip(" ")
        if not token:
            continue
        if token in ("trusted", "untrusted"):
            opts[token] = ""
            continue
        key, eq, value = token.partition("=")
        if not eq:
            warnings.append(f"unrecognized vif option '{token}' ignored")
            continue
        if key not in _VIF_KEYS and not key.startswith("colo_"):
            warnings.append(f"unrecognized vif option '{key}' ignored")
            continue
        opts[key] = value
    mac = opts.get("mac")
    if mac is not None:
        if not _MAC_RE.fullmatch(mac):
            raise ValueError(f"bad MAC address '{mac}' (expected six hex "
                             "bytes like 00:16:3e:12:34:56)")
        mac = mac.replace("-", ":").lower()
        first = int(mac[:2], 16)
        if first & 1:
            raise ValueError(f"MAC address '{mac}' is a multicast address")
        if mac == "00:00:00:00:00:00":
            raise ValueError("MAC address 00:00:00:00:00:00 is not valid")
    vtype = opts.get("type")
    if vtype is not None and vtype not in ("vif", "ioemu"):
        raise ValueError(f"bad vif type '{vtype}' (use vif or ioemu)")
    mtu = None
    if "mtu" in opts:
        try:
            mtu = parse_xl_number(opts["mtu"])
        except ValueError:
            raise ValueError(f"bad mtu '{opts['mtu']}'") from None
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} out of range (68..65535)")
    if "devid" in opts:
        try:
            if parse_xl_number(opts["devid"]) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad devid '{opts['devid']}'") from None
    for key in ("bridge", "vifname"):
        name = opts.get(key)
        if name is not None and not _IFNAME_RE.fullmatch(name):
            raise ValueError(f"bad {key} '{name}' (a network interface name: 1 to 15 "
                             "characters, no '/', ':' or blanks)")
    ip = opts.get("ip")
    if ip is not None:
        for addr in ip.split():
            try:
                ipaddress.ip_interface(addr)
            except ValueError:
                raise ValueError(f"bad IP address '{addr}'") from None
    if "rate" in opts:
        parse_vif_rate(opts["rate"])
    if "script" in opts and (not opts["script"] or "\0" in opts["script"]):
        raise ValueError("empty script (give a hotplug script's path or name)")
    if "netdev" in opts:
        warnings.append("vif option 'netdev' is deprecated, use gatewaydev")
    gwdev = opts.get("gatewaydev", opts.get("netdev"))
    if gwdev is not None and not _IFNAME_RE.fullmatch(gwdev):
        raise ValueError(f"bad gatewaydev '{gwdev}' (a network interface name: 1 to 15 "
                         "characters, no '/', ':' or blanks)")
    return VifSpec(spec=spec, options=opts, mac=mac, bridge=opts.get("bridge"),
                   ip=ip, model=opts.get("model"), type=vtype, mtu=mtu), warnings


# --- domain config ---------------------------------------------------------------

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_CPU_ITEM_RE = re.compile(r"\^?(all|(?:nodes?:)?[0-9]+(?:-[0-9]+)?)")

#: Keys this module interprets.
KNOWN_KEYS = frozenset({
    "name", "uuid", "type", "builder", "memory", "maxmem", "vcpus",
    "maxvcpus", "kernel", "ramdisk", "cmdline", "root", "extra",
    "on_poweroff", "on_reboot", "on_crash", "on_watchdog", "on_soft_reset",
    "disk", "vif", "cpus", "cpu_weight", "cap", "cpu_cap", "localtime",
    "seclabel",
    "disk_secrets",  # pyxen: ["VDEV=FILE"], the passphrase of an encrypted qcow2 disk
})

#: Keys xl knows (xl.cfg(5)) that pyxen does not implement: warned about
#: as "not supported" rather than "unknown".
XL_OTHER_KEYS = frozenset({
    "pool", "cpus_soft", "vnuma", "firmware", "pvshim", "pvshim_path",
    "pvshim_cmdline", "pvshim_extra", "init_seclabel", "max_grant_frames",
    "max_maptrack_frames", "max_grant_version", "nomigrate", "driver_domain",
    "device_tree", "passthrough", "xend_suspend_evtchn_compat",
    "vmtrace_buf_kb", "vpmu", "xenstore_feature_mask", "xenstore_quota",
    "vtpm", "p9", "pvcalls", "vfb", "vkb", "vif2", "channel", "rdm",
    "usbctrl", "usbdev", "pci", "pci_permissive", "pci_msitranslate",
    "pci_seize", "pci_power_mgmt", "gfx_passthru", "rdm_mem_boundary",
    "dtdev", "ioports", "iomem", "irqs", "max_event_channels", "vdispl",
    "dm_restrict", "device_model_user", "vsnd", "virtio", "tee",
    "bootloader", "bootloader_args", "bootloader_restrict",
    "bootloader_user", "e820_host", "boot", "hdtype", "hap", "oos",
    "shadow_memory", "bios", "bios_path_override", "pae", "acpi",
    "acpi_s3", "acpi_s4", "acpi_laptop_slate", "apic", "nx", "hpet",
    "altp2m", "altp2mhvm", "nestedhvm", "cpuid", "acpi_firmware",
    "smbios_firmware", "smbios", "ms_vm_genid", "tsc_mode", "rtc_timeoffset",
    "vpt_align", "timer_mode", "mmio_hole", "xen_platform_pci",
    "xen_platform_pci_bar_uc", "viridian", "hvm_pirq", "videoram", "stdvga",
    "vga", "vnc", "vnclisten", "vncdisplay", "vncunused", "vncpasswd",
    "keymap", "sdl", "display", "xauthority", "opengl", "nographic",
    "spice", "spicehost", "spiceport", "spicetls_port",
    "spicedisable_ticketing", "spicepasswd", "spiceagent_mouse",
    "spicevdagent", "spice_clipboard_sharing", "spiceusbredirection",
    "spice_image_compression", "spice_streaming_video", "serial", "soundhw",
    "vkb_device", "usb", "usbversion", "usbdevice", "vendor_device",
    "device_model_version", "device_model_override", "stubdomain_kernel",
    "stubdomain_cmdline", "stubdomain_ramdisk", "stubdomain_memory",
    "device_model_stubdomain_override", "device_model_stubdomain_seclabel",
    "device_model_args", "device_model_args_pv", "device_model_args_hvm",
    "gic_version", "vuart", "sve", "llc_colors", "nr_spis",
    "trap_unmapped_accesses", "arm_sci", "mca_caps", "msr_relaxed",
    "claim_mode", "period", "slice", "latency", "extratime",
    "blkdev_start", "device_model", "vncviewer", "vncconsole",
    "on_xend_start", "on_xend_stop", "cpuid_check",
    "suppress_spurious_page_faults", "vscsi",
}) - KNOWN_KEYS


class _Loader:
    """Turns a RawConfig into a DomainConfig, collecting warnings."""

    def __init__(self, raw: RawConfig, config_dir: Path) -> None:
        self.raw = raw
        self.config_dir = config_dir
        self.warnings: list[str] = []

    def missing(self, key: str, what: str) -> ConfigError:
        return ConfigError(what, filename=self.raw.filename, key=key)

    def warn(self, s: Setting, what: str, at: Value | None = None) -> None:
        src, line = s.where_of(at)
        self.warnings.append(f"{src}:{line}: {what}")

    def string(self, key: str) -> str | None:
        return self.raw.get_string(key)

    def candidates(self, source: str, value: str) -> list[Path]:
        """Where a relative path may live, in order of preference.

        Settings from the file look next to the file first (so a config
        and its kernel can be moved together), then in the current
        directory; command-line overrides look in the current directory
        first, then next to the file.
        """
        p = Path(value)
        if p.is_absolute():
            return [p]
        cwd = Path.cwd()
        bases = [self.config_dir, cwd]
        if source == COMMAND_LINE:
            bases.reverse()
        out: list[Path] = []
        for b in bases:
            c = b / p
            if c not in out:
                out.append(c)
        return out

    def resolve(self, source: str, value: str) -> Path:
        """The first candidate that exists, else the first candidate."""
        cands = self.candidates(source, value)
        for c in cands:
            if c.exists():
                return c
        return cands[0]

    def file_path(self, key: str) -> Path | None:
        s = self.raw.get(key)
        value = self.string(key)
        if s is None or value is None:
            return None
        if not value:
            raise s.error("empty path")
        cands = self.candidates(s.source, value)
        for c in cands:
            if c.is_file():
                return c
        for c in cands:
            if c.exists():
                raise s.error(f"'{c}' is not a regular file")
        looked = " and ".join(f"'{c}'" for c in cands)
        raise s.error(f"file not found: '{value}' (looked for {looked})")

    def load(self) -> DomainConfig:
        raw = self.raw
        self.check_type()
        name = self.name()
        u = self.uuid()

        memory = raw.get_int("memory", minimum=1, maximum=MAX_MEMORY_MIB)
        maxmem = raw.get_int("maxmem", minimum=1, maximum=MAX_MEMORY_MIB)
        if memory is None:
            memory = maxmem if maxmem is not None else DEFAULT_MEMORY_MIB
        if maxmem is None:
            maxmem = memory
        elif maxmem < memory:
            s = raw.get("maxmem")
            assert s is not None
            raise s.error(f"maxmem ({maxmem} MiB) is less than memory "
                          f"({memory} MiB)")
        vcpus = raw.get_int("vcpus", minimum=1, maximum=MAX_VCPUS) or 1
        maxvcpus = raw.get_int("maxvcpus", minimum=1, maximum=MAX_VCPUS)
        if maxvcpus is None:
            maxvcpus = vcpus
        elif maxvcpus < vcpus:
            s = raw.get("maxvcpus")
            assert s is not None
            raise s.error(f"maxvcpus ({maxvcpus}) is less than vcpus "
                          f"({vcpus})")
        self.check_sizes(memory, maxmem, vcpus, maxvcpus)

        kernel = self.file_path("kernel")
        if kernel is None:
            hint = ""
            if "bootloader" in raw or "firmware" in raw:
                hint = " (bootloader= and firmware= are not supported)"
            raise self.missing("kernel", "required: pyxen boots PV kernels "
                               "directly, set kernel = \"/path/to/kernel\""
                               + hint)
        if "bootloader" in raw:
            s = raw.get("bootloader")
            assert s is not None
            self.warn(s, "'bootloader' is not supported by pyxen; booting "
                      "kernel= directly")
        ramdisk = self.file_path("ramdisk")

        cfg = DomainConfig(
            name=name, kernel=kernel, memory=memory, maxmem=maxmem,
            vcpus=vcpus, maxvcpus=maxvcpus, raw=raw, uuid=u,
            ramdisk=ramdisk, cmdline=self.cmdline(),
            disks=self.disks(), vifs=self.vifs(), cpus=self.cpus(),
            cpu_weight=raw.get_int("cpu_weight", minimum=1, maximum=65535),
            cap=self.cap(), localtime=bool(raw.get_bool("localtime")),
            seclabel=self.string("seclabel"),
        )
        for key, default in _ACTION_DEFAULTS.items():
            setattr(cfg, key, self.action(key, default))
        self.unknown_keys()
        return cfg

    def blame(self, key: str, fallback: str, what: str) -> ConfigError:
        """An error about ``key``'s value, located where it was set.

        A size that was not written (memory defaults to maxmem, or to
        DEFAULT_MEMORY_MIB) is blamed on ``fallback``'s setting, else on
        the file."""
        s = self.raw.get(key) or self.raw.get(fallback)
        if s is None:
            return self.missing(key, what)
        return ConfigError(what, filename=s.source, line=s.line, key=s.key)

    def check_sizes(self, memory: int, maxmem: int, vcpus: int,
                    maxvcpus: int) -> None:
        """Refuse what this host and pyxen cannot give a domain, up front.

        Without this, an absurd size surfaces as KVM's bare EEXIST from
        deep in the machine setup (or as swapping once the guest touches
        its lazily allocated RAM), and a second vCPU would be accepted
        but never run.  The domain builder checks the same for API
        callers (``domctl.check_spec``)."""
        why = hostmem.too_much(memory)
        if why:
            raise self.blame("memory", "maxmem", why)
        for key, mib in (("memory", memory), ("maxmem", maxmem)):
            if mib > MAX_RAM_MIB:
                raise self.blame(key, "maxmem" if key == "memory" else "memory",
                                 f"{mib} MiB is more than a pyxen domain can "
                                 f"have (at most {MAX_RAM_MIB} MiB)")
        for key, n in (("vcpus", vcpus), ("maxvcpus", maxvcpus)):
            if n > SUPPORTED_VCPUS:
                raise self.blame(key, "vcpus", f"only {SUPPORTED_VCPUS} vCPU "
                                 "is supported so far (secondary vCPUs are "
                                 f"not implemented), got {n}")

    def check_type(self) -> None:
        pv_only = "pyxen runs PV guests only"
        s = self.raw.get("type")
        t = self.string("type")
        if s is not None and t is not None and t != "pv":
            if t in ("pvh", "hvm"):
                raise s.error(f"{pv_only} (type = \"pv\"), not '{t}'")
            raise s.error(f"unknown guest type '{t}' (xl knows pv, pvh, hvm;"
                          f" {pv_only})")
        s = self.raw.get("builder")
        b = self.string("builder")
        if s is not None and b is not None and b not in ("generic", "linux"):
            if b == "hvm":
                raise s.error(f"{pv_only} (builder = \"generic\"), not 'hvm'")
            raise s.error(f"unknown builder '{b}' (xl knows generic, hvm)")

    def name(self) -> str:
        s = self.raw.get("name")
        name = self.string("name")
        if s is None or name is None:
            raise self.missing("name", "required: every domain needs a name "
                               "(name = \"...\")")
        why = domain_name_problem(name)  # the daemon's rule (paths.py): what xl takes
        if why:
            raise s.error(f"bad domain name {name!r}: {why}")
        return name

    def uuid(self) -> uuidlib.UUID | None:
        s = self.raw.get("uuid")
        text = self.string("uuid")
        if s is None or text is None:
            return None
        if not _UUID_RE.fullmatch(text):
            raise s.error(f"bad UUID '{text}' (expected xxxxxxxx-xxxx-xxxx-"
                          "xxxx-xxxxxxxxxxxx)")
        return uuidlib.UUID(text)

    def cmdline(self) -> str:
        """xl's rule: cmdline wins; else "root=ROOT EXTRA"."""
        cmd = self.string("cmdline")
        root = self.string("root")
        extra = self.string("extra")
        if cmd is not None:
            if root is not None or extra is not None:
                s = self.raw.get("cmdline")
                assert s is not None
                self.warn(s, "ignoring root= and extra= in favour of cmdline=")
            return cmd
        parts = []
        if root is not None:
            parts.append(f"root={root}")
        if extra is not None:
            parts.append(extra)
        return " ".join(parts)

    def action(self, key: str, default: ShutdownAction) -> ShutdownAction:
        s = self.raw.get(key)
        text = self.string(key)
        if s is None or text is None:
            return default
        try:
            return ShutdownAction(text)
        except ValueError:
            names = ", ".join(a.value for a in ShutdownAction)
            raise s.error(f"unknown action '{text}' (use one of {names})"
                          ) from None

    def cap(self) -> int | None:
        if "cpu_cap" in self.raw:
            s = self.raw.get("cpu_cap")
            assert s is not None
            if "cap" in self.raw:
                self.warn(s, "'cpu_cap' is not an xl key; ignored in favour "
                          "of 'cap'")
            else:
                self.warn(s, "'cpu_cap' is not an xl key; treating it as "
                          "'cap'")
                return self.raw.get_int("cpu_cap", minimum=0)
        return self.raw.get_int("cap", minimum=0)

    def cpus(self) -> str | list[str] | None:
        s = self.raw.get("cpus")
        if s is None:
            return None
        items: list[Atom]
        if isinstance(s.value, Atom):
            items = [s.value]
        else:
            items = self.raw.get_list("cpus") or []
        for a in items:
            for part in a.text.split(","):
                if not _CPU_ITEM_RE.fullmatch(part.strip()):
                    raise s.error(f"bad CPU list '{a.text}' (e.g. \"all\", "
                                  "\"0-3,^1\", \"nodes:0\")", a)
        if isinstance(s.value, Atom):
            return s.value.text
        return [a.text for a in items]

    def disks(self) -> list[DiskSpec]:
        s = self.raw.get("disk")
        items = self.raw.get_list("disk")
        if s is None or items is None:
            return []
        out: list[DiskSpec] = []
        seen: dict[int, Atom] = {}
        for a in items:
            try:
                d = parse_disk_spec(a.text)
            except ValueError as e:
                raise s.error(f"'{a.text}': {e}", a) from None
            if d.devid in seen:
                other = seen[d.devid]
                src, line = s.where_of(other)
                where = f"line {line}" if src == s.where_of(a)[0] else \
                    f"{src}:{line}"
                raise s.error(f"vdev '{d.vdev}' is used twice (also by "
                              f"'{other.text}' on {where})", a)
            seen[d.devid] = a
            if d.format not in SUPPORTED_DISK_FORMATS:
                raise s.error(f"'{a.text}': disk format '{d.format.value}' "
                              "is not supported by pyxen (use raw or qcow2)",
                              a)
            if d.script is not None:
                self.warn(s, f"disk '{a.text}': block scripts are not "
                          f"supported by pyxen; script '{d.script}' ignored",
                          a)
            if (d.target is not None and d.nbd is None and d.script is None
                    and d.target):
                d = replace(d, path=self.resolve(s.where_of(a)[0], d.target))
            out.append(d)
        return out

    def vifs(self) -> list[VifSpec]:
        s = self.raw.get("vif")
        items = self.raw.get_list("vif")
        if s is None or items is None:
            return []
        out = []
        devids: dict[int, Atom] = {}
        macs: dict[str, Atom] = {}
        for a in items:
            try:
                v, warns = parse_vif_spec(a.text)
            except ValueError as e:
                raise s.error(f"'{a.text}': {e}", a) from None
            for w in warns:
                self.warn(s, f"vif '{a.text}': {w}", a)
            # as libxl: devid= or the next free one, a MAC only once
            devid = parse_xl_number(v.options["devid"]) if "devid" in v.options else \
                next(i for i in range(len(items) + len(devids) + 1) if i not in devids)
            if devid in devids:
                raise s.error(f"'{a.text}': devid {devid} is used twice (also by "
                              f"'{devids[devid].text}')", a)
            devids[devid] = a
            if v.mac is not None:
                if v.mac in macs:
                    raise s.error(f"'{a.text}': MAC {v.mac} is used twice (also by "
                                  f"'{macs[v.mac].text}')", a)
                macs[v.mac] = a
            if "script" in v.options:
                try:
                    check_vif_script(v.options["script"])
                    check_vif_mode(v, devid)
                except ValueError as e:
                    raise s.error(f"'{a.text}': {e}", a) from None
            for opt in ("model", "vlan", "accel", "backend"):
                if opt in v.options:
                    self.warn(s, f"vif '{a.text}': option '{opt}' is not supported by pyxen yet; ignored", a)
            if v.type == "ioemu":
                self.warn(s, f"vif '{a.text}': type=ioemu has no emulated NIC in pyxen (PV only)", a)
            out.append(replace(v, devid=devid))
        return out

    def unknown_keys(self) -> None:
        for key, s in self.raw.effective().items():
            if key in KNOWN_KEYS or key == "bootloader":
                continue
            if key in XL_OTHER_KEYS:
                self.warn(s, f"key '{key}' is not supported by pyxen (PV "
                          "guests); ignored")
            else:
                self.warn(s, f"unknown key '{key}' ignored")


def build_domain_config(raw: RawConfig, config_dir: str | Path | None = None
                        ) -> tuple[DomainConfig, list[str]]:
    """Validate a RawConfig into a DomainConfig; returns (config, warnings).

    ``config_dir`` is where relative paths written in the file are looked
    up first (default: the current directory).
    """
    base = Path(config_dir) if config_dir is not None else Path.cwd()
    loader = _Loader(raw, base.absolute())
    cfg = loader.load()
    return cfg, loader.warnings


def load_domain_config(path: str | Path, overrides: Sequence[str] = ()
                       ) -> tuple[DomainConfig, list[str]]:
    """Read, parse and validate an xl.cfg file plus ``KEY=VALUE`` overrides.

    Overrides use the file syntax (``'memory=64'``, ``'extra="x=1"'``,
    ``'disk=["..."]'``), are applied after the file in order (so ``+=``
    appends to the file's value) and are reported as
    ``<command line>:N`` where N is the override's position.  Returns
    ``(config, warnings)``; raises :class:`ConfigError` for every problem.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file",
                          filename=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}",
                          filename=str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError("not a text file (invalid UTF-8)",
                          filename=str(path), line=line) from None
    raw = parse_xl_cfg(text, str(path))
    for i, ov in enumerate(overrides, 1):
        before = len(raw.settings)
        parse_xl_cfg(ov, COMMAND_LINE, into=raw, line=i)
        if len(raw.settings) == before:
            raise ConfigError(f"expected KEY=VALUE, got '{ov}'",
                              filename=COMMAND_LINE, line=i)
    cfg, warnings = build_domain_config(raw, p.absolute().parent)
    cfg.source = p
    return cfg, warnings


"""Tests for pyxen.toolstack.xlcfg: xl.cfg syntax and domain config."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxen import hostmem
from pyxen.hostmem import MAX_RAM_MIB
from pyxen.toolstack import xlcfg
from pyxen.toolstack.xlcfg import (
    COMMAND_LINE,
    DEFAULT_MEMORY_MIB,
    MAX_LIST_DEPTH,
    Atom,
    ConfigError,
    DiskFormat,
    DomainConfig,
    NbdTarget,
    Op,
    RawConfig,
    ShutdownAction,
    Value,
    ValueList,
    build_domain_config,
    load_domain_config,
    parse_disk_spec,
    parse_vif_spec,
    parse_xl_cfg,
    parse_xl_number,
    vdev_to_devid,
)

# --- helpers -------------------------------------------------------------------


def cfg_error(text: str, filename: str = "t.cfg") -> str:
    with pytest.raises(ConfigError) as ei:
        parse_xl_cfg(text, filename)
    return str(ei.value)


def scalars(raw: RawConfig) -> dict[str, str]:
    return {k: s.value.text for k, s in raw.effective().items()
            if isinstance(s.value, Atom)}


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    """A directory holding a dummy kernel and a minimal config."""
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    (tmp_path / "initrd").write_bytes(b"")
    (tmp_path / "g.cfg").write_text('name = "g"\nkernel = "vmlinux"\n')
    return tmp_path


def load(guest: Path, body: str, overrides: list[str] | None = None
         ) -> tuple[DomainConfig, list[str]]:
    path = guest / "t.cfg"
    path.write_text(body)
    return load_domain_config(path, overrides or [])


def load_error(guest: Path, body: str, overrides: list[str] | None = None
               ) -> str:
    with pytest.raises(ConfigError) as ei:
        load(guest, body, overrides)
    return str(ei.value).replace(str(guest / "t.cfg"), "t.cfg")


BASE = 'name = "g"\nkernel = "vmlinux"\n'  # lines 1-2


# --- syntax ----------------------------------------------------------------------


def test_basic_settings_and_separators() -> None:
    raw = parse_xl_cfg('a = 1\nb="two"; c=\'three\'\n\n;;\nd=0x10', "t.cfg")
    assert scalars(raw) == {"a": "1", "b": "two", "c": "three", "d": "0x10"}
    assert [s.line for s in raw.settings] == [1, 2, 2, 5]
    assert raw.get("a") == raw.settings[0]
    assert raw.get("a").value == Atom("1", False, 1)  # type: ignore[union-attr]
    assert raw.get("b").value == Atom("two", True, 2)  # type: ignore[union-attr]
    assert raw.keys() == ["a", "b", "c", "d"]
    assert "a" in raw and "zz" not in raw


def test_comments_whitespace_crlf_bom() -> None:
    text = ("\ufeff# leading comment\r\n  memory\t=  64   # trailing\r\n"
            "name = 'x#y'\n# last comment without newline")
    raw = parse_xl_cfg(text, "t.cfg")
    assert scalars(raw) == {"memory": "64", "name": "x#y"}
    assert raw.get("name").line == 3  # type: ignore[union-attr]


def test_empty_file() -> None:
    assert parse_xl_cfg("", "t.cfg").settings == []
    assert parse_xl_cfg("\n# only\n\n", "t.cfg").settings == []


def test_key_charset() -> None:
    raw = parse_xl_cfg("on_poweroff='x'\nvnc.listen='y'\nMixed_Case9=1",
                       "t.cfg")
    assert raw.keys() == ["on_poweroff", "vnc.listen", "Mixed_Case9"]


def test_string_escapes() -> None:
    raw = parse_xl_cfg(r'''a = "q\"s\'b\\n\n\t\r\a\b\f\v"
b = 'it\'s'
c = "\x41\x7a\101\0end"
d = "# not a comment"
e = ""''', "t.cfg")
    assert scalars(raw) == {
        "a": "q\"s'b\\n\n\t\r\a\b\f\v",
        "b": "it's",
        "c": "AzA\0end",
        "d": "# not a comment",
        "e": "",
    }


def test_string_errors() -> None:
    assert cfg_error('a = 1\nb = "abc\nc = 2') == (
        "t.cfg:2: unterminated string (strings cannot span lines)")
    assert cfg_error("b = 'abc") == (
        "t.cfg:1: unterminated string (strings cannot span lines)")
    assert cfg_error('b = "abc\\') == (
        "t.cfg:1: unterminated string (strings cannot span lines)")
    assert cfg_error('\nb = "a\\qb"') == "t.cfg:2: invalid escape '\\q' in a string"
    assert "two hex digits" in cfg_error('b = "\\x4"')


def test_lists() -> None:
    raw = parse_xl_cfg('''disk = [ 'a',
    "b" ,   # comment inside a list

    3,
]
empty = []
nested = [ [1, 2], ["x"], [] ]
one = [ 'x' ]
''', "t.cfg")
    disk = raw.get("disk")
    assert disk is not None and disk.line == 1
    assert isinstance(disk.value, ValueList)
    assert [a.text for a in disk.value.items if isinstance(a, Atom)] == [
        "a", "b", "3"]
    assert [a.line for a in disk.value.items] == [1, 2, 4]
    assert raw.get_string_list("disk") == ["a", "b", "3"]
    assert raw.get_string_list("empty") == []
    assert raw.get_string_list("one") == ["x"]
    nested = raw.get("nested")
    assert nested is not None and isinstance(nested.value, ValueList)
    assert len(nested.value.items) == 3
    with pytest.raises(ConfigError, match=r"t.cfg:7: nested: element 1 is a "
                                          r"list, expected a string"):
        raw.get_list("nested")


def test_list_errors() -> None:
    assert cfg_error("d = [,]") == "t.cfg:1: d: empty list element"
    assert cfg_error("d = ['a',,'b']") == "t.cfg:1: d: empty list element"
    assert cfg_error("d = ['a'\n'b']") == (
        "t.cfg:2: d: expected ',' or ']' in list, found a string")
    assert cfg_error("x=1\nd = ['a',\n  'b'\n") == (
        "t.cfg:4: d: unterminated list (no ']' for the '[' on line 2)")
    assert cfg_error("d = ]") == (
        "t.cfg:1: d: expected a value (number, \"string\" or [list]), "
        "found ']'")


def test_statement_errors() -> None:
    assert cfg_error('\n\ntype = pv') == (
        't.cfg:3: type: bare word \'pv\' is not a value; strings must be '
        'quoted: type = "pv"')
    assert cfg_error("memory 64") == (
        "t.cfg:1: memory: expected '=' after the key, found number '64'")
    assert cfg_error("memory =\n64") == "t.cfg:1: memory: missing value"
    assert cfg_error("memory =") == "t.cfg:1: memory: missing value"
    assert cfg_error("a = 1 b = 2") == (
        "t.cfg:1: a: unexpected 'b' after the value (put one setting per "
        "line, or separate them with ';')")
    assert cfg_error("= 3") == (
        "t.cfg:1: expected a setting (KEY = VALUE), found '='")
    assert cfg_error("42 = 3") == (
        "t.cfg:1: expected a setting (KEY = VALUE), found number '42'")


def test_python_and_floats_are_rejected() -> None:
    msg = cfg_error("memory = 1.5")
    assert msg.startswith("t.cfg:1: floating-point number '1.…'")
    msg = cfg_error("import os\nx = os.getenv('X')")
    assert msg.startswith("t.cfg:1: ")  # 'import os' is two idents
    msg = cfg_error("x = (1)")
    assert "unexpected character '('" in msg and "not Python" in msg
    assert "unexpected character '@'" in cfg_error("x = @")


def test_reassignment_and_append() -> None:
    raw = parse_xl_cfg('''memory = 64
memory = 128
extra = "a=1"
extra += " b=2"
disk = ['x']
disk += ['y', 'z']
new += "fresh"
''', "t.cfg")
    assert raw.get_int("memory") == 128
    assert raw.get_string("extra") == "a=1 b=2"
    assert raw.get_string_list("disk") == ["x", "y", "z"]
    assert raw.get_string("new") == "fresh"
    assert raw.get("new").op is Op.APPEND  # type: ignore[union-attr]
    assert len(raw.settings) == 7


def test_append_errors() -> None:
    assert cfg_error("d = ['x']\nd += 'y'") == (
        "t.cfg:2: d: can't add [list] to \"string\" or vice versa (previous "
        "value at t.cfg:1)")
    raw = parse_xl_cfg("m = 1\nm += 2", "t.cfg")
    with pytest.raises(ConfigError, match=r"t.cfg:2: m: can't use \+= with "
                                          "numbers"):
        raw.get_int("m")


def test_typed_getters() -> None:
    raw = parse_xl_cfg('''memory = "lots"
a = "64"
h = 0x40
o = 010
neg = "-3"
l = [1]
b0 = 0
b1 = 7
bs = "yes"
f = "1.5"
''', "hello.cfg")
    with pytest.raises(ConfigError) as ei:
        raw.get_int("memory")
    assert str(ei.value) == "hello.cfg:1: memory: expected a number, got 'lots'"
    assert isinstance(ei.value, ValueError)
    assert (ei.value.filename, ei.value.line, ei.value.key) == (
        "hello.cfg", 1, "memory")
    assert raw.get_int("a") == 64
    assert raw.get_int("h") == 64
    assert raw.get_int("o") == 8
    assert raw.get_int("neg") == -3
    assert raw.get_int("missing") is None
    with pytest.raises(ConfigError, match="must be at least 0, got -3"):
        raw.get_int("neg", minimum=0)
    with pytest.raises(ConfigError, match="must be at most 10, got 64"):
        raw.get_int("a", maximum=10)
    with pytest.raises(ConfigError, match="expected a number, got a list"):
        raw.get_int("l")
    with pytest.raises(ConfigError, match="expected a string, got a list"):
        raw.get_string("l")
    assert raw.get_string("h") == "0x40"
    assert raw.get_bool("b0") is False
    assert raw.get_bool("b1") is True
    assert raw.get_bool("missing") is None
    with pytest.raises(ConfigError, match=r"hello.cfg:9: bs: expected a "
                                          r"boolean \(0 or 1\), got 'yes'"):
        raw.get_bool("bs")
    with pytest.raises(ConfigError, match="integers"):
        raw.get_int("f")
    with pytest.raises(ConfigError, match="got a single value '64'"):
        raw.get_list("a")


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("7", 7), ("010", 8), ("0x1F", 31), ("0X1f", 31), ("-12", -12),
    ("+5", 5), ("  9", 9), ("9223372036854775807", 2**63 - 1),
    ("-9223372036854775808", -2**63),
])
def test_parse_xl_number(text: str, value: int) -> None:
    assert parse_xl_number(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "0x", "08", "1a", "64M", "1.5", "1e3", "5 ", "--1",
    "9223372036854775808", "0b101", "١٢",
])
def test_parse_xl_number_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_xl_number(text)


# --- round trip and fuzzing ------------------------------------------------------


def quote(s: str) -> str:
    """Quote a string in xl syntax using the escapes the lexer supports."""
    out = []
    for c in s:
        if c in "\"\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def render(v: Value) -> str:
    if isinstance(v, Atom):
        return quote(v.text) if v.quoted else v.text
    if not v.items:
        return "[ ]"
    return "[\n  " + ",\n  ".join(render(i) for i in v.items) + ",\n]"


def strip_lines(v: Value) -> object:
    if isinstance(v, Atom):
        return (v.text, v.quoted)
    return tuple(strip_lines(i) for i in v.items)


keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,12}", fullmatch=True)
atoms = st.one_of(
    st.builds(lambda t: Atom(t, True, 0),
              st.text(st.characters(max_codepoint=0x2FF, codec="utf-8"),
                      max_size=20)),
    st.builds(lambda n: Atom(n, False, 0),
              st.from_regex(r"[0-9][0-9a-fx]{0,8}", fullmatch=True)),
)
values = st.recursive(atoms, lambda inner: st.builds(
    lambda items: ValueList(tuple(items), 0), st.lists(inner, max_size=4)),
    max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(keys, values), max_size=8))
def test_round_trip(pairs: list[tuple[str, Value]]) -> None:
    text = "\n".join(f"{k} = {render(v)}  # c" for k, v in pairs)
    raw = parse_xl_cfg(text, "rt.cfg")
    assert [(s.key, strip_lines(s.value)) for s in raw.settings] == [
        (k, strip_lines(v)) for k, v in pairs]


_ALPHABET = st.sampled_from(list("ab_=+[],;#'\"\\ \t\n\r0x19.-:()é"))


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), st.text(_ALPHABET, max_size=80)))
def test_fuzz_parser_only_raises_config_error(text: str) -> None:
    try:
        raw = parse_xl_cfg(text, "fz.cfg")
    except ConfigError as e:
        assert str(e).startswith("fz.cfg:")
        return
    for s in raw.settings:
        assert s.source == "fz.cfg" and s.line >= 1


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("abcdehprvwx=,:/0123 ")), max_size=40))
def test_fuzz_disk_spec(spec: str) -> None:
    try:
        d = parse_disk_spec(spec)
    except ValueError:
        return
    assert d.vdev and d.devid >= 0


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["memory", "maxmem", "vcpus", "maxvcpus", "name",
                            "uuid", "kernel", "disk", "vif", "cpus", "type",
                            "on_crash", "cap", "cpu_weight", "extra",
                            "localtime", "ramdisk", "builder"]),
       value=st.one_of(st.text(max_size=30).map(quote),
                       st.from_regex(r"-?[0-9]{1,25}", fullmatch=True),
                       st.lists(st.text(max_size=20).map(quote), max_size=3)
                       .map(lambda xs: "[" + ",".join(xs) + "]")))
def test_fuzz_overrides_only_raise_config_error(guest: Path, key: str,
                                                value: str) -> None:
    try:
        load_domain_config(guest / "g.cfg", [f"{key}={value}"])
    except ConfigError as e:
        assert str(e).startswith((str(guest / "g.cfg"), COMMAND_LINE))


# --- hostile input: nesting depth, size, fuzzing the whole pipeline -------------


def test_deep_nesting_is_a_located_config_error(guest: Path) -> None:
    """Attacks the recursive-descent list parser with 2000 nested '[': it
    used to escape as an uncaught RecursionError (a traceback, no place)."""
    deep = "[" * 2000
    assert cfg_error(f"a = 1\n\nx = {deep}") == (
        f"t.cfg:3: x: lists nested more than {MAX_LIST_DEPTH} deep")
    balanced = "[" * 2000 + "]" * 2000
    assert cfg_error(f"x = {balanced}") == (
        f"t.cfg:1: x: lists nested more than {MAX_LIST_DEPTH} deep")
    # the '[' that goes too deep is the one blamed, on its own line
    assert cfg_error("x = " + "[\n" * 3000).startswith(
        f"t.cfg:{MAX_LIST_DEPTH + 1}: x: lists nested more than")
    # the same through a config file (named by path) and an override
    path = guest / "deep.cfg"
    path.write_text(BASE + f"disk = {deep}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: disk: "
                                          "lists nested more than"):
        load_domain_config(path)
    assert load_error(guest, BASE, [f"disk = {deep}"]) == (
        f"{COMMAND_LINE}:1: disk: lists nested more than {MAX_LIST_DEPTH} "
        "deep")


def test_nesting_up_to_the_limit_parses() -> None:
    depth = MAX_LIST_DEPTH
    raw = parse_xl_cfg("x = " + "[" * depth + "1" + "]" * depth, "t.cfg")
    v = raw.get("x").value  # type: ignore[union-attr]
    for _ in range(depth):
        assert isinstance(v, ValueList) and len(v.items) == 1
        v = v.items[0]
    assert v == Atom("1", False, 1, "t.cfg")


class _TooMuchWork(Exception):
    pass


def _work(text: str, budget: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """How much work parsing ``text`` and reading every key's value takes.

    Counted, not timed: the lines of xlcfg.py that execute (a Python loop
    over earlier statements shows up here) plus the size of every value
    built (a C-level copy such as concatenating a long string shows up
    there).  Stops with _TooMuchWork once ``budget`` is exceeded, so that
    quadratic code fails fast instead of running for minutes.
    """
    count = 0

    def spend(n: int) -> None:
        nonlocal count
        count += n
        if count > budget:
            raise _TooMuchWork

    # (decorated again so that the generated __init__ calls __post_init__)
    @dataclass(frozen=True)
    class CountingAtom(Atom):
        def __post_init__(self) -> None:
            spend(len(self.text))

    @dataclass(frozen=True)
    class CountingList(ValueList):
        def __post_init__(self) -> None:
            spend(len(self.items))

    monkeypatch.setattr(xlcfg, "Atom", CountingAtom)
    monkeypatch.setattr(xlcfg, "ValueList", CountingList)
    code_file = xlcfg.__file__

    def local(frame: FrameType, event: str, arg: object) -> object:
        if event == "line":
            spend(1)
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> object:
        return local if frame.f_code.co_filename == code_file else None

    sys.settrace(tracer)
    try:
        raw = parse_xl_cfg(text, "big.cfg")
        for key in raw.keys():
            raw.get(key).value  # type: ignore[union-attr]  # noqa: B018
    finally:
        sys.settrace(None)
        monkeypatch.undo()
    return count


@pytest.mark.parametrize("shape, n", [
    pytest.param(lambda n: "".join(f"key_{i} = {i}\n" for i in range(n)),
                 5000, id="distinct-keys"),
    pytest.param(lambda n: "s = 'x'\n" + "s += 'yyyyyyyy'\n" * n,
                 2500, id="string-appends"),
    pytest.param(lambda n: "l = ['x']\n" + "l += ['y', 'z']\n" * n,
                 2500, id="list-appends"),
    pytest.param(lambda n: "k = 1\n" * n, 2500, id="same-key"),
])
def test_parse_work_is_linear(shape: Callable[[int], str], n: int,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacks the parser with many statements (40000 keys took 19 s:
    every statement scanned all earlier ones, and every '+=' copied the
    whole value so far).  8x the statements may cost at most 10x the work
    (linear: 8x; the old quadratic code: ~64x, and it stops at the budget)."""
    small = _work(shape(n), 1 << 62, monkeypatch)
    try:
        big = _work(shape(8 * n), 10 * small, monkeypatch)
    except _TooMuchWork:
        pytest.fail(f"{8 * n} statements cost more than 10x the work of {n} "
                    f"({small}): not linear")
    assert big <= 10 * small


def test_many_keys_through_the_loader(guest: Path) -> None:
    """40000 unknown keys: the loader's warnings come out one per key."""
    body = BASE + "".join(f"unknown_{i} = {i}\n" for i in range(40000))
    cfg, warnings = load(guest, body)
    assert cfg.name == "g" and len(warnings) == 40000
    assert warnings[-1].endswith("t.cfg:40002: unknown key 'unknown_39999' "
                                 "ignored")


_HOSTILE_TOKENS = st.sampled_from([
    "[", "[", "[", "]", ",", "=", "+=", ";", "\n", " ", "#c\n", "k", "memory",
    "disk", "vif", "name", "1", "0x", "010", "9" * 30, "'s'", '"\\x4"', '"\\',
    "'\\q'", "é", "\ufeff", "\r", "\x00", "-1", "1.5", "\"a,b=c\"", "k.z",
])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_HOSTILE_TOKENS, max_size=60), st.integers(0, 3000))
def test_fuzz_hostile_token_streams(tokens: list[str], depth: int) -> None:
    """Random token soup, with a run of '[' up to past the depth limit in
    front: the parser gives a located ConfigError or a config, nothing
    else (no RecursionError, IndexError, AssertionError...)."""
    text = "x = " + "[" * depth + "".join(tokens)
    try:
        raw = parse_xl_cfg(text, "fz.cfg")
    except ConfigError as e:
        assert re.match(r"fz\.cfg:\d+: ", str(e)), str(e)
        return
    assert all(s.line >= 1 for s in raw.settings)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.sampled_from(["memory", "maxmem", "vcpus", "maxvcpus", "name", "uuid",
                     "kernel", "ramdisk", "disk", "vif", "cpus", "type",
                     "builder", "on_crash", "on_reboot", "cap", "cpu_cap",
                     "cpu_weight", "extra", "root", "cmdline", "localtime",
                     "seclabel", "bootloader", "vnc", "zz"]),
    st.sampled_from(["=", "+="]),
    st.one_of(
        st.from_regex(r"-?(0x)?[0-9a-f]{0,20}", fullmatch=True),
        st.text(max_size=25).map(quote),
        st.lists(st.text(st.sampled_from(list("abx=,:/0129 ")), max_size=25)
                 .map(quote), max_size=3)
        .map(lambda xs: "[" + ",".join(xs) + "]"),
        st.integers(0, 100).map(lambda d: "[" * d + "]" * d))),
    max_size=8))
def test_fuzz_whole_loader_only_raises_config_error(
        guest: Path, stmts: list[tuple[str, str, str]]) -> None:
    """Fuzz file -> parse -> validate -> DomainConfig with hostile
    values for every key pyxen reads: only ConfigError, always located."""
    body = BASE + "".join(f"{k} {op} {v}\n" for k, op, v in stmts)
    try:
        cfg, _ = load(guest, body)
    except ConfigError as e:
        assert str(e).startswith(str(guest / "t.cfg")), str(e)
        return
    assert cfg.vcpus == cfg.maxvcpus == 1 and 1 <= cfg.memory <= cfg.maxmem


# --- sizes a domain can really have ---------------------------------------------


def test_loader_imports_no_kvm_code() -> None:
    """The CLI parses configs and must start fast: xlcfg (and the size
    limits it checks) must not pull in the KVM bindings or the hypervisor."""
    code = ("import sys, pyxen.toolstack.xlcfg; "
            "print(sorted(m for m in sys.modules if m.startswith('pyxen.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert "pyxen.kvm" not in out and "pyxen.hv" not in out, out




@pytest.fixture
def meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /proc/meminfo saying 1024 MiB are available."""
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:  4194304 kB\nMemFree:  2097152 kB\n"
                 "MemAvailable:    1048576 kB\n")
    monkeypatch.setattr(hostmem, "MEMINFO", str(p))
    return p


def test_memory_beyond_the_host_is_refused_up_front(guest: Path,
                                                    meminfo: Path) -> None:
    """Attacks the create path with memory larger than the host has: it
    used to end in KVM's '[Errno 17] ioctl 0x4020ae46: File exists' with
    no key or line (or a domain that swaps the host once it runs)."""
    assert load_error(guest, BASE + "memory = 2048") == (
        f"t.cfg:3: memory: 2048 MiB is more than this host has available "
        f"(1024 MiB MemAvailable in {meminfo})")
    cfg, _ = load(guest, BASE + "memory = 1024")
    assert cfg.memory == 1024
    # memory taken from maxmem is blamed on maxmem's line
    assert load_error(guest, BASE + "maxmem = 4096") == (
        f"t.cfg:3: maxmem: 4096 MiB is more than this host has available "
        f"(1024 MiB MemAvailable in {meminfo})")
    # maxmem is a ceiling (balloon), not an allocation: above the host is
    # fine, above what the address map holds is not
    cfg, _ = load(guest, BASE + "memory = 64\nmaxmem = 8192")
    assert cfg.maxmem == 8192
    assert load_error(guest, BASE + "memory = 64\nmaxmem = 500000") == (
        "t.cfg:4: maxmem: 500000 MiB is more than a pyxen domain can have "
        f"(at most {MAX_RAM_MIB} MiB)")
    assert load_error(guest, BASE, ["memory=500000"]) == (
        f"{COMMAND_LINE}:1: memory: 500000 MiB is more than this host has "
        f"available (1024 MiB MemAvailable in {meminfo})")


def test_memory_500000_on_this_host(guest: Path) -> None:
    """The README's reproducer against the real /proc/meminfo."""
    msg = load_error(guest, BASE + "memory = 500000")
    assert msg.startswith("t.cfg:3: memory: 500000 MiB is more than "), msg
    assert "MemAvailable" in msg or f"at most {MAX_RAM_MIB}" in msg


def test_memory_without_meminfo(guest: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "MEMINFO", str(guest / "no-such-file"))
    cfg, _ = load(guest, BASE + "memory = 4096")
    assert cfg.memory == 4096
    assert hostmem.available_mib() is None


@pytest.mark.parametrize("value, what", [
    ("0", "must be at least 1, got 0"),
    ('"-64"', "must be at least 1, got -64"),
    ('"1.5"', "expected a number, got '1.5' (xl numbers are integers)"),
    ('"64M"', "expected a number, got '64M'"),
    ("[64]", "expected a number, got a list"),
])
def test_bad_memory_values(guest: Path, value: str, what: str) -> None:
    assert load_error(guest, BASE + f"memory = {value}") == (
        f"t.cfg:3: memory: {what}")


def test_secondary_vcpus_are_refused(guest: Path) -> None:
    """vcpus=2 used to be accepted and logged while only vCPU 0 ever ran."""
    assert load_error(guest, BASE + "vcpus = 2") == (
        "t.cfg:3: vcpus: only 1 vCPU is supported so far (secondary vCPUs "
        "are not implemented), got 2")
    assert load_error(guest, BASE + "vcpus = 1\nmaxvcpus = 4") == (
        "t.cfg:4: maxvcpus: only 1 vCPU is supported so far (secondary "
        "vCPUs are not implemented), got 4")
    assert load_error(guest, BASE, ["maxvcpus=2"]).startswith(
        f"{COMMAND_LINE}:1: maxvcpus: only 1 vCPU is supported so far")


# --- domain config ---------------------------------------------------------------


def test_minimal_config_defaults(guest: Path) -> None:
    cfg, warnings = load_domain_config(guest / "g.cfg")
    assert warnings == []
    assert cfg.name == "g"
    assert cfg.kernel == guest / "vmlinux"
    assert cfg.memory == cfg.maxmem == DEFAULT_MEMORY_MIB == 128
    assert cfg.vcpus == cfg.maxvcpus == 1
    assert cfg.uuid is None and cfg.ramdisk is None
    assert cfg.type == "pv"
    assert cfg.cmdline == ""
    assert cfg.on_poweroff is ShutdownAction.DESTROY
    assert cfg.on_reboot is ShutdownAction.RESTART
    assert cfg.on_crash is ShutdownAction.DESTROY
    assert cfg.on_watchdog is ShutdownAction.DESTROY
    assert cfg.on_soft_reset is ShutdownAction.SOFT_RESET
    assert cfg.disks == [] and cfg.vifs == []
    assert cfg.source == guest / "g.cfg"
    assert cfg.raw.get_string("name") == "g"
    assert "raw=" not in repr(cfg)


def test_full_config(guest: Path) -> None:
    cfg, warnings = load(guest, BASE + '''
uuid = "12345678-9abc-DEF0-1234-56789abcdef0"
memory = 256
maxmem = 512
vcpus = 1; maxvcpus = 1
ramdisk = "initrd"
cmdline = "console=hvc0 app=ticker"
on_poweroff = "preserve"
on_reboot = "rename-restart"
on_crash = "coredump-restart"
on_watchdog = "coredump-destroy"
on_soft_reset = "destroy"
cpus = ["0-3,^1", "all", "nodes:0,^node:1"]
cpu_weight = 512
cap = 50
localtime = 1
seclabel = "system_u:system_r:domU_t"
type = "pv"
builder = "generic"
''')
    assert warnings == []
    assert cfg.uuid == uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    assert (cfg.memory, cfg.maxmem, cfg.vcpus, cfg.maxvcpus) == (256, 512, 1, 1)
    assert cfg.ramdisk == guest / "initrd"
    assert cfg.cmdline == "console=hvc0 app=ticker"
    assert cfg.on_poweroff is ShutdownAction.PRESERVE
    assert cfg.on_reboot is ShutdownAction.RENAME_RESTART
    assert cfg.on_crash is ShutdownAction.COREDUMP_RESTART
    assert cfg.on_watchdog is ShutdownAction.COREDUMP_DESTROY
    assert cfg.on_soft_reset is ShutdownAction.DESTROY
    assert cfg.cpus == ["0-3,^1", "all", "nodes:0,^node:1"]
    assert (cfg.cpu_weight, cfg.cap, cfg.localtime) == (512, 50, True)
    assert cfg.seclabel == "system_u:system_r:domU_t"


def test_missing_required_keys(guest: Path) -> None:
    assert load_error(guest, 'kernel = "vmlinux"') == (
        't.cfg: name: required: every domain needs a name (name = "...")')
    assert load_error(guest, 'name = "g"') == (
        't.cfg: kernel: required: pyxen boots PV kernels directly, set '
        'kernel = "/path/to/kernel"')
    msg = load_error(guest, 'name = "g"\nbootloader = "pygrub"')
    assert "bootloader= and firmware= are not supported" in msg


def test_memory_rules(guest: Path) -> None:
    cfg, _ = load(guest, BASE + "maxmem = 512")
    assert (cfg.memory, cfg.maxmem) == (512, 512)  # xl: memory = maxmem
    cfg, _ = load(guest, BASE + "memory = 64")
    assert (cfg.memory, cfg.maxmem) == (64, 64)
    assert load_error(guest, BASE + "memory = 256\nmaxmem = 128") == (
        "t.cfg:4: maxmem: maxmem (128 MiB) is less than memory (256 MiB)")
    assert load_error(guest, BASE + "memory = 0") == (
        "t.cfg:3: memory: must be at least 1, got 0")
    assert load_error(guest, BASE + 'memory = "lots"') == (
        "t.cfg:3: memory: expected a number, got 'lots'")
    assert "must be at most" in load_error(guest, BASE + "memory=99999999999")


def test_vcpu_rules(guest: Path) -> None:
    cfg, _ = load(guest, BASE + "vcpus = 1")
    assert (cfg.vcpus, cfg.maxvcpus) == (1, 1)
    assert load_error(guest, BASE + "vcpus = 4\nmaxvcpus = 2") == (
        "t.cfg:4: maxvcpus: maxvcpus (2) is less than vcpus (4)")
    assert load_error(guest, BASE + "vcpus = 0") == (
        "t.cfg:3: vcpus: must be at least 1, got 0")
    assert "must be at most 512" in load_error(guest, BASE + "vcpus = 10000")


@pytest.mark.parametrize("name", ["a", "web-01", "x.y_z", "_", "A" * 64,
                                  "1st", "has space", "my vm~1", "-x", "ünï"])
def test_good_names(guest: Path, name: str) -> None:
    cfg, _ = load(guest, f'name = "{name}"\nkernel = "vmlinux"')
    assert cfg.name == name


@pytest.mark.parametrize(("name", "what"), [
    ("", "bad domain name ''"),
    ("a/b", "bad domain name 'a/b': a domain name must not contain '/'"),
    ("x/../../tmp/evil", "must not contain '/'"),
    ("A" * 65, "bad domain name"),
    ("123", "all-digit"),
    ("Domain-0", "reserved"),
])
def test_bad_names(guest: Path, name: str, what: str) -> None:
    msg = load_error(guest, f'kernel = "vmlinux"\nname = "{name}"')
    assert msg.startswith("t.cfg:2: name: ") and what in msg


def test_uuid_validation(guest: Path) -> None:
    assert load_error(guest, BASE + 'uuid = "not-a-uuid"') == (
        "t.cfg:3: uuid: bad UUID 'not-a-uuid' (expected "
        "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    assert "bad UUID" in load_error(
        guest, BASE + 'uuid = "{12345678-9abc-def0-1234-56789abcdef0}"')


@pytest.mark.parametrize(("line", "msg"), [
    ('type = "hvm"', "pyxen runs PV guests only (type = \"pv\"), not 'hvm'"),
    ('type = "pvh"', "pyxen runs PV guests only (type = \"pv\"), not 'pvh'"),
    ('type = "weird"', "unknown guest type 'weird'"),
    ('builder = "hvm"', "pyxen runs PV guests only"),
    ('builder = "foo"', "unknown builder 'foo'"),
])
def test_guest_type(guest: Path, line: str, msg: str) -> None:
    err = load_error(guest, BASE + line)
    assert err.startswith("t.cfg:3: ") and msg in err


def test_legacy_builder_spellings(guest: Path) -> None:
    for b in ("generic", "linux"):
        cfg, w = load(guest, BASE + f'builder = "{b}"')
        assert cfg.type == "pv" and w == []


def test_cmdline_composition(guest: Path) -> None:
    cfg, w = load(guest, BASE + 'root = "/dev/xvda1 ro"\nextra = "quiet"')
    assert cfg.cmdline == "root=/dev/xvda1 ro quiet" and w == []
    cfg, _ = load(guest, BASE + 'root = "/dev/xvda1"')
    assert cfg.cmdline == "root=/dev/xvda1"
    cfg, _ = load(guest, BASE + 'extra = "app=ticker count=3"')
    assert cfg.cmdline == "app=ticker count=3"
    cfg, w = load(guest, BASE + 'extra = "x"\ncmdline = "c"')
    assert cfg.cmdline == "c"
    assert w == ["t.cfg:4: ignoring root= and extra= in favour of cmdline="
                 .replace("t.cfg", str(guest / "t.cfg"))]


def test_shutdown_action_errors(guest: Path) -> None:
    msg = load_error(guest, BASE + 'on_crash = "explode"')
    assert msg.startswith("t.cfg:3: on_crash: unknown action 'explode' (use "
                          "one of destroy, restart, rename-restart")
    assert "soft-reset" in msg


def test_unknown_and_unsupported_keys_warn(guest: Path) -> None:
    cfg, w = load(guest, BASE + 'vnc = 1\nfrobnicate = "x"\nserial = "pty"\n'
                  'usb = 1\nfrobnicate = "y"')
    f = str(guest / "t.cfg")
    assert w == [
        f"{f}:3: key 'vnc' is not supported by pyxen (PV guests); ignored",
        f"{f}:7: unknown key 'frobnicate' ignored",
        f"{f}:5: key 'serial' is not supported by pyxen (PV guests); ignored",
        f"{f}:6: key 'usb' is not supported by pyxen (PV guests); ignored",
    ]
    assert cfg.raw.get_string("frobnicate") == "y"


def test_bootloader_warns_when_kernel_given(guest: Path) -> None:
    _, w = load(guest, BASE + 'bootloader = "pygrub"')
    assert len(w) == 1 and "'bootloader' is not supported" in w[0]


def test_cap_and_cpu_cap(guest: Path) -> None:
    cfg, w = load(guest, BASE + "cpu_cap = 25")
    assert cfg.cap == 25 and "treating it as 'cap'" in w[0]
    cfg, w = load(guest, BASE + "cpu_cap = 25\ncap = 10")
    assert cfg.cap == 10 and "ignored in favour of 'cap'" in w[0]
    assert "must be at least 1" in load_error(guest, BASE + "cpu_weight = 0")
    assert "must be at least 0" in load_error(guest, BASE + 'cap = "-1"')
    assert "negative numbers must be quoted" in load_error(guest,
                                                           BASE + "cap = -1")


def test_cpus_validation(guest: Path) -> None:
    cfg, _ = load(guest, BASE + 'cpus = "all,^7"')
    assert cfg.cpus == "all,^7"
    assert load_error(guest, BASE + 'cpus = "0-3,bogus"') == (
        "t.cfg:3: cpus: bad CPU list '0-3,bogus' (e.g. \"all\", \"0-3,^1\", "
        "\"nodes:0\")")
    assert load_error(guest, BASE + 'cpus = ["1",\n "x"]').startswith(
        "t.cfg:4: cpus: bad CPU list 'x'")


# --- paths -----------------------------------------------------------------------


def test_kernel_path_prefers_config_dir(guest: Path, tmp_path_factory:
                                        pytest.TempPathFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path_factory.mktemp("cwd")
    (other / "vmlinux").write_bytes(b"cwd")
    (other / "only-in-cwd").write_bytes(b"cwd")
    monkeypatch.chdir(other)
    cfg, _ = load_domain_config(guest / "g.cfg")
    assert cfg.kernel == guest / "vmlinux"  # config dir wins
    (guest / "g2.cfg").write_text('name="g"\nkernel="only-in-cwd"\n')
    cfg, _ = load_domain_config(guest / "g2.cfg")
    assert cfg.kernel == other / "only-in-cwd"  # CWD fallback
    # Overrides look in the CWD first.
    cfg, _ = load_domain_config(guest / "g.cfg", ['kernel="vmlinux"'])
    assert cfg.kernel == other / "vmlinux"
    # Relative config path: the directory is still the config's.
    monkeypatch.chdir(guest.parent)
    cfg, _ = load_domain_config(Path(guest.name) / "g.cfg")
    assert cfg.kernel.is_absolute() and cfg.kernel.read_bytes() == b"\x7fELF"


def test_kernel_path_errors(guest: Path, monkeypatch: pytest.MonkeyPatch
                            ) -> None:
    monkeypatch.chdir(guest)
    msg = load_error(guest, 'name="g"\nkernel = "nope"')
    assert msg.startswith("t.cfg:2: kernel: file not found: 'nope' (looked "
                          "for ")
    assert str(guest / "nope") in msg
    (guest / "dir").mkdir()
    assert "is not a regular file" in load_error(guest,
                                                  'name="g"\nkernel="dir"')
    assert load_error(guest, 'name="g"\nkernel=""') == (
        "t.cfg:2: kernel: empty path")
    assert "ramdisk: file not found" in load_error(
        guest, BASE + 'ramdisk = "/no/such/initrd"')


def test_absolute_kernel_path(guest: Path) -> None:
    cfg, _ = load(guest, f'name="g"\nkernel="{guest / "vmlinux"}"')
    assert cfg.kernel == guest / "vmlinux"


# --- overrides -------------------------------------------------------------------


def test_overrides(guest: Path) -> None:
    cfg, w = load_domain_config(guest / "g.cfg", [
        "memory=64",
        'extra="app=ticker count=3"',
        'disk=["format=raw,vdev=xvda,target=/tmp/d.img"]',
        "extra+=' more'",
        "vcpus=1; maxvcpus=1",
    ])
    assert w == []
    assert cfg.memory == 64
    assert cfg.cmdline == "app=ticker count=3 more"
    assert cfg.disks[0].target == "/tmp/d.img"
    assert (cfg.vcpus, cfg.maxvcpus) == (1, 1)
    s = cfg.raw.get("memory")
    assert s is not None and (s.source, s.line) == (COMMAND_LINE, 1)


def test_override_replaces_file_value(guest: Path) -> None:
    cfg, _ = load(guest, BASE + "memory = 512", ["memory=256"])
    assert cfg.memory == 256


def test_override_errors(guest: Path) -> None:
    def e(*ov: str) -> str:
        with pytest.raises(ConfigError) as ei:
            load_domain_config(guest / "g.cfg", list(ov))
        return str(ei.value)
    assert e("memory=64", "memory=lots") == (
        "<command line>:2: memory: bare word 'lots' is not a value; strings "
        "must be quoted: memory = \"lots\" (in a shell: 'memory=\"lots\"')")
    assert e('memory="lots"') == (
        "<command line>:1: memory: expected a number, got 'lots'")
    assert e("memory") == (
        "<command line>:1: memory: expected '=' after the key, found end of "
        "input")
    assert e("") == "<command line>:1: expected KEY=VALUE, got ''"
    assert e("name='bad/name'") == (
        "<command line>:1: name: bad domain name 'bad/name': a domain name "
        "must not contain '/'")


def test_override_unknown_key_warns(guest: Path) -> None:
    _, w = load_domain_config(guest / "g.cfg", ["foo=1"])
    assert w == ["<command line>:1: unknown key 'foo' ignored"]


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.cfg: cannot read config "
                                          r"file: No such file"):
        load_domain_config(tmp_path / "missing.cfg")
    with pytest.raises(ConfigError, match="is a directory"):
        load_domain_config(tmp_path)
    (tmp_path / "bin.cfg").write_bytes(b'name="x"\n\xff\xfe\n')
    with pytest.raises(ConfigError, match=r"bin.cfg:2: not a text file"):
        load_domain_config(tmp_path / "bin.cfg")
    (tmp_path / "syn.cfg").write_text('name = "x"\nmemory = [1,\n')
    with pytest.raises(ConfigError, match=r"syn.cfg:3: memory: unterminated "
                                          r"list"):
        load_domain_config(tmp_path / "syn.cfg")


def test_build_domain_config_from_text(guest: Path) -> None:
    raw = parse_xl_cfg('name="t"\nkernel="vmlinux"', "inline")
    cfg, w = build_domain_config(raw, guest)
    assert cfg.kernel == guest / "vmlinux" and cfg.source is None and w == []


# --- disks -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "raw:/dev/vg/guest-volume,hda,w",
    "vdev=hda,mode=w,target=/dev/vg/guest-volume",
    "  /dev/vg/guest-volume , raw , hda , rw",
])
def test_disk_doc_examples_disk(spec: str) -> None:
    d = parse_disk_spec(spec)
    assert (d.target, d.format, d.vdev, d.readwrite, d.cdrom) == (
        "/dev/vg/guest-volume", DiskFormat.RAW, "hda", True, False)
    assert d.devid == 3 << 8


@pytest.mark.parametrize("spec", [
    "/root/image.iso,,hdc,cdrom",
    "/root/image.iso,,hdc,,cdrom",
    "/root/image.iso,raw,hdc,devtype=cdrom",
    "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
    "raw:/root/image.iso,hdc:cdrom,ro",
])
def test_disk_doc_examples_cdrom(spec: str) -> None:
    d = parse_disk_spec(spec)
    assert (d.target, d.format, d.vdev, d.readwrite, d.cdrom) == (
        "/root/image.iso", DiskFormat.RAW, "hdc", False, True)


def test_disk_legacy_and_prefixes() -> None:
    d = parse_disk_spec("phy:/dev/sdb,xvda,w")
    assert (d.target, d.vdev, d.readwrite, d.format) == (
        "/dev/sdb", "xvda", True, DiskFormat.RAW)
    d = parse_disk_spec("file:/path/img,xvdb,r")
    assert (d.target, d.vdev, d.readwrite) == ("/path/img", "xvdb", False)
    d = parse_disk_spec("tap:aio:/path/img,xvdc,w")
    assert (d.target, d.vdev) == ("/path/img", "xvdc")
    d = parse_disk_spec("tap:qcow2:/img.qcow2,xvdd,w")
    assert d.format is DiskFormat.QCOW2
    d = parse_disk_spec("iscsi:iqn.2001-05.com.example:disk,xvde,w")
    assert d.script == "block-iscsi"
    d = parse_disk_spec(",hdc:cdrom,r")
    assert (d.target, d.format, d.cdrom, d.vdev) == (
        None, DiskFormat.EMPTY, True, "hdc")
    with pytest.raises(ValueError, match="unknown deprecated disk prefix"):
        parse_disk_spec("weird:/x,xvda")


def test_disk_keywords_and_flags() -> None:
    d = parse_disk_spec("vdev=xvda,backendtype=qdisk,backend=dd,"
                        "specification=virtio,direct-io-safe,no-discard,"
                        "untrusted,grant_usage=1,format=qcow2,"
                        "target=/a,b=c,d")
    assert d.target == "/a,b=c,d"  # target= swallows the rest
    assert (d.backendtype, d.backend, d.specification) == (
        "qdisk", "dd", "virtio")
    assert (d.direct_io_safe, d.discard, d.trusted, d.grant_usage) == (
        True, False, False, True)
    assert d.format is DiskFormat.QCOW2
    d = parse_disk_spec(",,xvda,target=/x,")  # empty positional, then target=
    assert d.target == "/x"
    with pytest.raises(ValueError, match="target respecified"):
        parse_disk_spec("/y,,xvda,target=/x")
    with pytest.raises(ValueError, match="no vdev"):  # target= must be last
        parse_disk_spec("target=/img ,vdev=xvda")


def test_disk_nbd_target() -> None:
    d = parse_disk_spec("vdev=xvda, target=nbd://10.0.0.1:1234/exp")
    assert d.target == "nbd://10.0.0.1:1234/exp"
    assert d.nbd == NbdTarget("10.0.0.1", 1234, "exp")
    d = parse_disk_spec("nbd://server/my%20disk,raw,xvdb")
    assert d.nbd == NbdTarget("server", 10809, "my disk")
    assert d.script is None
    d = parse_disk_spec("vdev=xvdc,target=nbd://[::1]:99")
    assert d.nbd == NbdTarget("::1", 99, "")
    with pytest.raises(ValueError, match="bad NBD"):
        parse_disk_spec("vdev=xvdc,target=nbd://")
    with pytest.raises(ValueError, match="bad NBD port"):
        parse_disk_spec("vdev=xvdc,target=nbd://h:0/x")


@pytest.mark.parametrize(("spec", "what"), [
    ("/img", "no vdev specified"),
    ("format=raw,vdev=xvda", "no target specified"),
    ("/img,vmdk,xvda", "unknown disk format 'vmdk'"),
    ("/img,raw,xvda,rw,extra", "too many positional parameters"),
    ("/img,raw,xvda,rx", "unknown access mode 'rx'"),
    ("/img,,xvda,vdev=xvdb", "vdev respecified"),
    ("format=raw,/img,qcow2,xvda", "unknown access mode 'xvda'"),
    ("format=raw,format=qcow2,vdev=xvda,target=/i", "format respecified"),
    ("/img,,xvda,colour=red", "unknown parameter 'colour=red'"),
    ("/img,,xvda,devtype=floppy", "unknown devtype 'floppy'"),
    ("/img,,xvda:floppy", "unknown device type 'floppy'"),
    ("/img,,xvda,backendtype=magic", "unknown backendtype"),
    ("/img,,xvda,specification=nfs", "unknown specification"),
    ("/img,,floppy0", "bad vdev 'floppy0'"),
    ("/img,,hde", "out of range"),
])
def test_disk_errors(spec: str, what: str) -> None:
    with pytest.raises(ValueError, match=what.replace("(", r"\(")):
        parse_disk_spec(spec)


@pytest.mark.parametrize(("vdev", "devid"), [
    ("xvda", 202 << 8), ("xvdb1", 202 << 8 | 1 << 4 | 1),
    ("xvdp15", 202 << 8 | 15 << 4 | 15),
    ("xvdq", 1 << 28 | 16 << 8), ("xvda16", 1 << 28 | 16),
    ("xvdtq37", 1 << 28 | 536 << 8 | 37), ("d536p37", 1 << 28 | 536 << 8 | 37),
    ("d0", 202 << 8), ("d1p2", 202 << 8 | 1 << 4 | 2),
    ("sda", 8 << 8), ("sdb3", 8 << 8 | 1 << 4 | 3),
    ("hda", 3 << 8), ("hdb", 3 << 8 | 1 << 6), ("hdc2", 22 << 8 | 2),
    ("hdd63", 22 << 8 | 1 << 6 | 63), ("xvdaa", 1 << 28 | 26 << 8),
    ("51712", 51712), ("0xca00", 51712),
])
def test_vdev_to_devid(vdev: str, devid: int) -> None:
    assert vdev_to_devid(vdev) == devid


@pytest.mark.parametrize("vdev", ["sdq", "sda16", "hde", "hda64", "xvda256",
                                  "cdrom", "", "xvd", "09"])
def test_vdev_to_devid_rejects(vdev: str) -> None:
    with pytest.raises(ValueError):
        vdev_to_devid(vdev)


def test_disks_in_domain_config(guest: Path) -> None:
    (guest / "disk.img").write_bytes(b"")
    cfg, w = load(guest, BASE + '''disk = [
  'format=raw, vdev=xvda, access=rw, target=disk.img',
  'phy:/dev/sdb,xvdb,w',
  'file:/path,xvdc,r',
  'vdev=xvdd, target=nbd://10.0.0.1:1234/exp',
]''')
    assert w == []
    a, b, c, d = cfg.disks
    assert a.path == guest / "disk.img" and a.target == "disk.img"
    assert b.path == Path("/dev/sdb")
    assert (c.path, c.readwrite) == (Path("/path"), False)
    assert d.path is None and d.nbd is not None


def test_disk_errors_in_domain_config(guest: Path) -> None:
    assert load_error(guest, BASE + "disk = ['/a,,xvda',\n  '/b']") == (
        "t.cfg:4: disk: '/b': no vdev specified (e.g. vdev=xvda)")
    assert load_error(guest, BASE + "disk = ['/a,,xvda',\n '/b,,xvda']") == (
        "t.cfg:4: disk: vdev 'xvda' is used twice (also by '/a,,xvda' on "
        "line 3)")
    assert load_error(guest, BASE + "disk = ['/a,vhd,xvda']") == (
        "t.cfg:3: disk: '/a,vhd,xvda': disk format 'vhd' is not supported "
        "by pyxen (use raw or qcow2)")
    assert load_error(guest, BASE + "disk = '/a,,xvda'") == (
        "t.cfg:3: disk: expected a list like [ \"...\", ... ], got a single "
        "value '/a,,xvda'")
    assert load_error(guest, BASE + "disk = [['/a,,xvda']]") == (
        "t.cfg:3: disk: element 1 is a list, expected a string")


def test_disk_script_warns(guest: Path) -> None:
    _, w = load(guest, BASE + "disk = ['drbd:res0,xvda,w']")
    assert len(w) == 1 and "block scripts are not supported" in w[0]


# --- vifs ------------------------------------------------------------------------


def test_vif_parsing() -> None:
    v, w = parse_vif_spec("mac=00:16:3E:01:02:03, bridge=xenbr0,ip=10.0.0.2 "
                          "fd00::2/64,model=e1000,type=vif,mtu=9000,"
                          "script=vif-bridge,vifname=v1,rate=10Mb/s,trusted")
    assert w == []
    assert v.mac == "00:16:3e:01:02:03"
    assert (v.bridge, v.ip, v.model, v.type, v.mtu) == (
        "xenbr0", "10.0.0.2 fd00::2/64", "e1000", "vif", 9000)
    assert v.options["script"] == "vif-bridge"
    assert v.options["trusted"] == ""
    v, w = parse_vif_spec("")
    assert v.options == {} and v.mac is None and w == []
    v, _ = parse_vif_spec("mac=00-16-3e-aa-bb-cc")
    assert v.mac == "00:16:3e:aa:bb:cc"
    v, w = parse_vif_spec("bridge=br0,colour=red,junk")
    assert w == ["unrecognized vif option 'colour' ignored",
                 "unrecognized vif option 'junk' ignored"]


@pytest.mark.parametrize(("spec", "what"), [
    ("mac=00:16:3e:01:02", "bad MAC address"),
    ("mac=00:16:3e:01:02:zz", "bad MAC address"),
    ("mac=00:16-3e:01:02:03", "bad MAC address"),
    ("mac=01:00:5e:00:00:01", "multicast"),
    ("mac=00:00:00:00:00:00", "not valid"),
    ("type=e1000", "bad vif type"),
    ("mtu=big", "bad mtu"),
    ("mtu=10", "out of range"),
    ("ip=10.0.0.300", "bad IP address"),
    ("devid=-1", "bad devid"),
])
def test_vif_errors(spec: str, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        parse_vif_spec(spec)


def test_vifs_in_domain_config(guest: Path) -> None:
    cfg, w = load(guest, BASE + "vif = [ 'mac=00:16:3e:00:00:01,bridge=br0',"
                  "\n 'bridge=br1,foo=bar' ]")
    assert [v.bridge for v in cfg.vifs] == ["br0", "br1"]
    assert w == [f"{guest / 't.cfg'}:4: vif 'bridge=br1,foo=bar': "
                 "unrecognized vif option 'foo' ignored"]
    assert load_error(guest, BASE + "vif = ['mac=zz']") == (
        "t.cfg:3: vif: 'mac=zz': bad MAC address 'zz' (expected six hex "
        "bytes like 00:16:3e:12:34:56)")


def test_appended_list_keeps_element_sources(guest: Path) -> None:
    f = str(guest / "t.cfg")
    with pytest.raises(ConfigError) as ei:
        load(guest, BASE + "disk = ['/a,,xvda',\n '/b,,xvdz,bogus']",
             ["disk += ['/c,,xvdc']"])
    assert str(ei.value) == (f"{f}:4: disk: '/b,,xvdz,bogus': unknown access "
                             "mode 'bogus' (use r, ro, w or rw)")
    with pytest.raises(ConfigError) as ei:
        load(guest, BASE + "disk = ['/a,,xvda']", ["disk += ['/c,,xvda']"])
    assert str(ei.value) == ("<command line>:1: disk: vdev 'xvda' is used "
                             f"twice (also by '/a,,xvda' on {f}:3)")
    cfg, _ = load(guest, BASE + "disk = ['img,,xvda']",
                  ["disk += ['img,,xvdb']"])
    assert cfg.disks[0].path == guest / "img"  # file entry: config dir first
    assert cfg.disks[1].path == Path.cwd() / "img"  # override: CWD first

"""The XenStore database: nodes, permissions, quotas, transactions and watch matching.

Pure logic, no I/O apart from `save`/`load` of the state file.  Everything
here follows the C xenstored (tools/xenstored/{core,transaction,watch,
domain}.c) in behaviour: the error names, the permission rules, which
events a change fires and who may see them.

Model:

* `Store.nodes` maps a canonical path ("/", "/local/domain/1/name", and the
  two special nodes "@introduceDomain" and "@releaseDomain") to an immutable
  `Node`.  Children are kept in each node, in creation order, as xenstored
  keeps them; DIRECTORY returns them in that order.
* Every modification stamps the node with a fresh value of the store's
  global generation counter (xenstored's `generation`).
* `Caller` is who asks: a domid, whether the connection is privileged (dom0's
  socket clients are), and an optional SET_TARGET domain.
* A `Transaction` is a snapshot: a shallow copy of `nodes` (nodes are
  immutable, so this is copy-on-write).  It records the generation of every
  path it looks at or changes, the first time it does.  Commit fails with
  EAGAIN if any of those paths has a different generation (or existence) in
  the live store; otherwise the modified paths are copied over and the
  queued watch events fire.
* Operations return the `Change`s they made; the daemon matches them against
  the connections' `Watch`es (`watch_fires`, `watch_permitted`).

Errors are raised as `XsError(name)` where name is one of xs_wire.h's
`xsd_errors` strings; the daemon turns them into XS_ERROR replies.

Locking: none here.  The daemon (server.py) serialises all calls.
"""

from __future__ import annotations

import base64
import enum
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------
# constants (xs_wire.h, xen.h, xenstore_lib.h)

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

XS_PERM_NONE = 0x00
XS_PERM_READ = 0x01
XS_PERM_WRITE = 0x02
XS_PERM_OWNER = 0x08          # internal: "may change permissions"
_PERM_ALL = XS_PERM_READ | XS_PERM_WRITE | XS_PERM_OWNER

DOMID_SELF = 0x7FF0
DOMID_ANY = 0x7FF5            # "all domains" in a permission entry

# xsd_errors, in xs_wire.h's order.  The *name* goes on the wire.
XSD_ERRORS = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
              "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")

SPECIAL_NODES = ("@introduceDomain", "@releaseDomain")

_VALID_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
_LOCAL_DOMAIN = re.compile(r"/local/domain/\d{1,5}/")
_NODE_HDR_SIZE = 16           # struct node_hdr: u64 generation, u16 num_perms, u16 datalen, u32 childlen
_PERM_SIZE = 8                # struct xs_permissions: unsigned id, perms


class XsError(Exception):
    """A request failed with one of xenstored's error names (EINVAL, ENOENT, ...)."""

    def __init__(self, name: str, detail: str = "") -> None:
        assert name in XSD_ERRORS, name
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name


# ---------------------------------------------------------------------------
# quotas (tools/xenstored/domain.c: quota_adm[] and quotas[])


@dataclass
class Quotas:
    """Hard quotas for unprivileged domains; 0 disables one.

    The defaults are xenstored's.  Like xenstored a quota is exceeded when
    the value reaches it (`value >= quota`), and exceeding one gives ENOSPC.
    So with the default of 1000 nodes a domain can own 999 of them, with
    128 watches it can hold 127.  `outstanding` and `memory` are about a
    connection's output queue: server.py enforces them (Connection.can_read,
    send_event).
    """

    nodes: int = 1000
    watches: int = 128
    outstanding: int = 20
    memory: int = 2 * 1024 * 1024 + 512 * 1024
    transactions: int = 10
    transaction_nodes: int = 1024
    node_permissions: int = 5
    path_max: int = XENSTORE_REL_PATH_MAX
    node_size: int = 2048

    # wire names, in xenstored's order
    NAMES = ("nodes", "watches", "outstanding", "memory", "transactions", "transaction-nodes",
             "node-permissions", "path-max", "node-size")

    def get(self, name: str) -> int:
        return int(getattr(self, name.replace("-", "_")))

    def set(self, name: str, value: int) -> None:
        if name not in self.NAMES:
            raise XsError("EINVAL", f"unknown quota {name}")
        setattr(self, name.replace("-", "_"), value)

    def exceeded(self, name: str, value: int) -> bool:
        quota = self.get(name)
        return quota != 0 and value >= quota

    def to_json(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Quotas:
        known = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------
# permissions


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry: a domid and XS_PERM_* bits.  The first entry of a
    node names its owner and the default for domains without an entry."""

    domid: int
    perm: int

    _LETTERS = {XS_PERM_NONE: "n", XS_PERM_READ: "r", XS_PERM_WRITE: "w",
                XS_PERM_READ | XS_PERM_WRITE: "b"}

    def __str__(self) -> str:
        # xenstore_perm_to_string: letter + "%i" of the id
        did = self.domid & 0xFFFFFFFF
        return self._LETTERS[self.perm & 3] + str(did - (1 << 32) if did >= 1 << 31 else did)


def _strtol(s: str) -> int | None:
    """C strtol(s, &end, 0) requiring the whole string; None if that fails."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", s)
    if not m:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        v = int(digits[2:], 16)
    elif digits.startswith("0"):
        v = int(digits, 8)
    else:
        v = int(digits)
    return -v if m.group(1) == "-" else v


def parse_perm(s: str) -> Perm:
    """One "<letter><domid>" string (xenstore_strings_to_perms); EINVAL if malformed."""
    letters = {"n": XS_PERM_NONE, "r": XS_PERM_READ, "w": XS_PERM_WRITE,
               "b": XS_PERM_READ | XS_PERM_WRITE}
    if not s or s[0] not in letters:
        raise XsError("EINVAL", f"bad permission {s!r}")
    domid = _strtol(s[1:])
    if domid is None:
        raise XsError("EINVAL", f"bad permission {s!r}")
    return Perm(domid & 0xFFFFFFFF, letters[s[0]])


def parse_perms(strings: Iterable[str]) -> tuple[Perm, ...]:
    perms = tuple(parse_perm(s) for s in strings)
    if not perms:
        raise XsError("EINVAL", "no permissions")
    return perms


def format_perms(perms: Iterable[Perm]) -> bytes:
    """GET_PERMS reply payload: each entry nul-terminated, e.g. b"w0\\0r1\\0"."""
    return b"".join(str(p).encode() + b"\0" for p in perms)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a request.  Privileged callers (dom0's socket clients) bypass
    permission checks and quotas; `target` is set by SET_TARGET."""

    domid: int = 0
    privileged: bool = True
    target: int | None = None

    @property
    def home(self) -> str:
        """Base of relative paths: /local/domain/<domid>."""
        return f"/local/domain/{self.domid}"


DOM0 = Caller(0, True)


def guest(domid: int) -> Caller:
    """An unprivileged caller for domain `domid`."""
    return Caller(domid, False)


def _allows(caller: Caller, p: Perm) -> bool:
    return p.domid == caller.domid or p.domid == DOMID_ANY or (
        caller.target is not None and p.domid == caller.target)


def perm_for(caller: Caller, perms: tuple[Perm, ...]) -> int:
    """The XS_PERM_* bits `caller` has on a node with `perms` (perm_for_conn)."""
    if caller.privileged or _allows(caller, perms[0]):
        return _PERM_ALL
    for p in perms[1:]:
        if _allows(caller, p):
            return p.perm & _PERM_ALL
    return perms[0].perm & _PERM_ALL


# ---------------------------------------------------------------------------
# nodes and paths


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...] = ()
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def size(self) -> int:
        """xenstored's accounted size (calc_node_acc_size), checked against the node-size quota."""
        return (_NODE_HDR_SIZE + _PERM_SIZE * len(self.perms) + len(self.value)
                + sum(len(c) + 1 for c in self.children))


def parent_of(name: str) -> str:
    """get_parent(): "/a/b" -> "/a", "/a" -> "/", "@x" -> "/"."""
    i = name.rfind("/", 1)
    return name[:i] if i > 0 else "/"


def basename(name: str) -> str:
    return name[name.rfind("/") + 1:]


def child_path(parent: str, child: str) -> str:
    return f"/{child}" if parent == "/" else f"{parent}/{child}"


def is_child(child: str, parent: str, depth: int = -1) -> bool:
    """Is `child` `parent` or below it (within `depth` levels if depth >= 0)? (watch.c is_child)"""
    n = len(parent)
    if not child.startswith(parent):
        return False
    if n > 1 and len(child) > n and child[n] != "/":
        return False
    if depth < 0 or len(child) == n:
        return True
    levels = 1 if n == 1 else 0
    i = n
    while levels <= depth:
        if i == len(child):
            return True
        if child[i] == "/":
            levels += 1
        i += 1
    return False


# ---------------------------------------------------------------------------
# changes and watches


class Match(enum.Enum):
    """How a change is matched against watch paths (watch.h enum watch_match)."""

    EXACT = "exact"        # the watch is on exactly this path (nodes below a removed one)
    SUBTREE = "subtree"    # the watch is on this path or an ancestor of it
    DEPTH = "depth"        # special "@x/<domid>" events
    NODEPTH = "nodepth"    # special "@x" events, only to watches without a depth


@dataclass(frozen=True, slots=True)
class Change:
    """A modification that fires watches.  `visible_to` holds permission sets:
    an unprivileged watcher sees the event if one of them grants it read
    (the node's, its parent's, or the node's permissions before the change)."""

    path: str
    match: Match
    visible_to: tuple[tuple[Perm, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class Watch:
    node: str              # canonical path or "@..."
    token: str
    depth: int = -1        # -1: no depth limit
    prefix_len: int = 0    # for relative watches: len(home) + 1, cut from event paths

    def fires_for(self, change: Change) -> bool:
        name = change.path
        if change.match is Match.EXACT:
            return name == self.node
        if change.match is Match.SUBTREE:
            return is_child(name, self.node, self.depth)
        if change.match is Match.DEPTH:
            return name == self.node or (self.depth > 0 and is_child(name, self.node, self.depth))
        return name == self.node and self.depth < 0

    def event_path(self, name: str) -> str:
        return name[self.prefix_len:]


def watch_permitted(caller: Caller, change: Change) -> bool:
    """May `caller`'s watches see `change`? (watch.c watch_permitted)"""
    if caller.privileged:
        return True
    return any(perm_for(caller, p) & XS_PERM_READ for p in change.visible_to if p)


# ---------------------------------------------------------------------------
# transactions


@dataclass(eq=False)
class Transaction:
    """A snapshot of the store that one caller reads and writes until commit."""

    caller: Caller
    nodes: dict[str, Node]
    counts: dict[int, int]
    # path -> (generation, permissions) when first touched; (None, None) if absent then
    accessed: dict[str, tuple[int | None, tuple[Perm, ...] | None]] = field(default_factory=dict)
    modified: dict[str, None] = field(default_factory=dict)     # ordered set
    events: dict[str, Match] = field(default_factory=dict)
    node_created: bool = False
    failed: bool = False

    def queue(self, path: str, match: Match) -> None:
        # a subtree event replaces an exact one, not the other way round (queue_watches)
        if path not in self.events or match is Match.SUBTREE:
            self.events[path] = match


class _View:
    """The nodes an operation works on: the live store, or a transaction's snapshot."""

    def __init__(self, store: Store, caller: Caller, tx: Transaction | None) -> None:
        self.store = store
        self.caller = caller
        self.tx = tx
        self.nodes = tx.nodes if tx else store.nodes
        self.counts = tx.counts if tx else store.counts
        self.changes: list[Change] = []

    def _track(self, path: str) -> None:
        tx = self.tx
        if tx is None or path in tx.accessed:
            return
        if not self.caller.privileged and self.store.quota(self.caller.domid).exceeded(
                "transaction-nodes", len(tx.accessed) + 1):
            tx.failed = True
            raise XsError("ENOSPC", "too many nodes in transaction")
        n = tx.nodes.get(path)
        tx.accessed[path] = (n.generation, n.perms) if n else (None, None)

    def get(self, path: str) -> Node | None:
        self._track(path)
        return self.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        self._track(path)
        old = self.nodes.get(path)
        if old is not None:
            self.counts[old.owner] = self.counts.get(old.owner, 0) - 1
        self.counts[node.owner] = self.counts.get(node.owner, 0) + 1
        self.nodes[path] = replace(node, generation=self.store.next_generation())
        if self.tx:
            self.tx.modified[path] = None

    def delete(self, path: str) -> None:
        self._track(path)
        old = self.nodes.pop(path)
        self.counts[old.owner] = self.counts.get(old.owner, 0) - 1
        self.store.next_generation()
        if self.tx:
            self.tx.modified[path] = None

    def emit(self, path: str, match: Match, *visible_to: tuple[Perm, ...]) -> None:
        if self.tx:
            self.tx.queue(path, match)
        else:
            self.changes.append(Change(path, match, tuple(visible_to)))


# ---------------------------------------------------------------------------
# the store


class Store:
    """The XenStore tree with xenstored's semantics.  See the module docstring."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.domain_quotas: dict[int, Quotas] = {}
        self.generation = 0
        self.nodes: dict[str, Node] = {}
        self.counts: dict[int, int] = {}
        # setup_structure(): "/", "/tool", "/tool/xenstored", and the special nodes
        n0 = (Perm(0, XS_PERM_NONE),)
        for path, children, perms in (("/", ("tool",), n0), ("/tool", ("xenstored",), n0),
                                      ("/tool/xenstored", (), n0),
                                      ("@releaseDomain", (), (Perm(0, XS_PERM_NONE),
                                                              Perm(DOMID_ANY, XS_PERM_READ))),
                                      ("@introduceDomain", (), n0)):
            self.nodes[path] = Node(b"", perms, children, self.next_generation())
            self.counts[0] = self.counts.get(0, 0) + 1

    # -- bookkeeping

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def quota(self, domid: int) -> Quotas:
        return self.domain_quotas.get(domid, self.quotas)

    def node_count(self, domid: int) -> int:
        """Nodes owned by `domid` (the nodes quota counts these)."""
        return self.counts.get(domid, 0)

    def get(self, path: str) -> Node | None:
        """The live node at a canonical path, without any checks (for the toolstack and tests)."""
        return self.nodes.get(path)

    # -- paths

    def canonicalize(self, caller: Caller, path: str, allow_special: bool = False) -> str:
        """A request's path made absolute and checked (core.c canonicalize); EINVAL if bad."""
        if not _VALID_CHARS.match(path) or (path.startswith("@") and not allow_special):
            raise XsError("EINVAL", f"bad path {path!r}")
        name = path if path.startswith(("/", "@")) else f"{caller.home}/{path}"
        if (name.endswith("/") and name != "/") or "//" in name:
            raise XsError("EINVAL", f"bad path {path!r}")
        if len(name) > XENSTORE_ABS_PATH_MAX:
            raise XsError("EINVAL", "path too long")
        m = _LOCAL_DOMAIN.match(name)
        local_off = m.end() if m else 0
        if not caller.privileged and self.quota(caller.domid).exceeded("path-max", len(name) - local_off):
            raise XsError("EINVAL", "path too long")
        return name

    # -- permission checks

    def _parent_perm(self, v: _View, name: str) -> int:
        """Permissions on the nearest existing ancestor of `name` (ask_parents)."""
        while True:
            name = parent_of(name)
            node = v.get(name)
            if node is not None:
                return perm_for(v.caller, node.perms)
            if name == "/":
                return XS_PERM_NONE

    def _get_node(self, v: _View, name: str, perm: int) -> Node:
        """The node at `name` if `caller` has all of `perm`; else ENOENT or EACCES,
        but EACCES whenever the nearest existing ancestor would not give `perm`,
        so that a refused caller learns nothing about what exists (get_node_chk_perm)."""
        node = v.get(name)
        if node is not None and perm_for(v.caller, node.perms) & perm == perm:
            return node
        err = "ENOENT" if node is None else "EACCES"
        if not self._parent_perm(v, name) & perm:
            err = "EACCES"
        raise XsError(err, name)

    def _check_size(self, v: _View, node: Node) -> None:
        if not v.caller.privileged and self.quota(v.caller.domid).exceeded("node-size", node.size()):
            raise XsError("ENOSPC", "node too big")

    # -- read-only requests

    def read(self, caller: Caller, path: str, tx: Transaction | None = None) -> bytes:
        v = _View(self, caller, tx)
        return self._get_node(v, self.canonicalize(caller, path), XS_PERM_READ).value

    def directory(self, caller: Caller, path: str, tx: Transaction | None = None) -> tuple[str, ...]:
        return self.directory_gen(caller, path, tx)[1]

    def directory_gen(self, caller: Caller, path: str, tx: Transaction | None = None
                      ) -> tuple[int, tuple[str, ...]]:
        """The children of a node and its generation (DIRECTORY_PART's <gencnt>)."""
        v = _View(self, caller, tx)
        node = self._get_node(v, self.canonicalize(caller, path), XS_PERM_READ)
        return node.generation, node.children

    def get_perms(self, caller: Caller, path: str, tx: Transaction | None = None) -> tuple[Perm, ...]:
        v = _View(self, caller, tx)
        return self._get_node(v, self.canonicalize(caller, path, allow_special=True), XS_PERM_READ).perms

    # -- modifying requests

    def write(self, caller: Caller, path: str, value: bytes, tx: Transaction | None = None) -> list[Change]:
        v = _View(self, caller, tx)
        name = self.canonicalize(caller, path)
        try:
            node = self._get_node(v, name, XS_PERM_WRITE)
        except XsError as e:
            if e.name != "ENOENT":
                raise
            node = self._create(v, name, value)
        else:
            node = replace(node, value=value)
            self._check_size(v, node)
            v.put(name, node)
        v.emit(name, Match.SUBTREE, node.perms, self._perms_of(v, parent_of(name)))
        return v.changes

    def mkdir(self, caller: Caller, path: str, tx: Transaction | None = None) -> list[Change]:
        v = _View(self, caller, tx)
        name = self.canonicalize(caller, path)
        try:
            self._get_node(v, name, XS_PERM_WRITE)
        except XsError as e:
            if e.name != "ENOENT":
                raise
            node = self._create(v, name, b"")
            v.emit(name, Match.SUBTREE, node.perms, self._perms_of(v, parent_of(name)))
        return v.changes

    def _perms_of(self, v: _View, path: str) -> tuple[Perm, ...]:
        node = v.nodes.get(path)
        return node.perms if node else ()

    def _create(self, v: _View, name: str, value: bytes) -> Node:
        """Create `name` and its missing ancestors, each inheriting its parent's
        permissions, owned by the caller if unprivileged (construct_node).
        All checks happen before anything changes."""
        missing = [name]
        while True:
            parent_name = parent_of(missing[-1])
            parent = v.get(parent_name)
            if parent is not None:
                break
            missing.append(parent_name)
        caller = v.caller
        if not caller.privileged:
            quota = self.quota(caller.domid)
            if quota.exceeded("nodes", v.counts.get(caller.domid, 0) + len(missing)):
                raise XsError("ENOSPC", "node quota")
        writes: list[tuple[str, Node]] = []
        parent = replace(parent, children=parent.children + (basename(missing[-1]),))
        writes.append((parent_name, parent))
        for i in range(len(missing) - 1, -1, -1):
            perms = parent.perms
            if not caller.privileged:
                perms = (Perm(caller.domid, perms[0].perm),) + perms[1:]
            child = (basename(missing[i - 1]),) if i > 0 else ()
            node = Node(value if i == 0 else b"", perms, child)
            writes.append((missing[i], node))
            parent = node
        for _, n in writes:
            self._check_size(v, n)
        for p, n in writes:
            v.put(p, n)
        if v.tx:
            v.tx.node_created = True
        return writes[-1][1]

    def rm(self, caller: Caller, path: str, tx: Transaction | None = None) -> list[Change]:
        v = _View(self, caller, tx)
        name = self.canonicalize(caller, path)
        try:
            self._get_node(v, name, XS_PERM_WRITE)
        except XsError as e:
            if e.name != "ENOENT":
                raise
            if v.get(parent_of(name)) is None:
                raise
            return v.changes        # gone already and the parent exists: fine
        if name == "/":
            raise XsError("EINVAL", "cannot remove /")
        self._rm_subtree(v, name)
        return v.changes

    def _rm_subtree(self, v: _View, name: str) -> None:
        """Delete `name` and everything below it, children first, firing an exact
        event for each node below and a subtree event for `name` (delnode_sub)."""
        parent_name = parent_of(name)
        order: list[str] = []
        stack = [name]
        while stack:                        # right-to-left pre-order; reversed, it is post-order
            p = stack.pop()
            node = v.get(p)
            if node is None:
                continue
            order.append(p)
            stack.extend(child_path(p, c) for c in node.children)
        for p in reversed(order):
            node = v.nodes[p]
            v.emit(p, Match.SUBTREE if p == name else Match.EXACT, node.perms,
                   self._perms_of(v, parent_of(p)))
            v.delete(p)
        parent = v.get(parent_name)
        if parent is not None:
            base = basename(name)
            v.put(parent_name, replace(parent, children=tuple(c for c in parent.children if c != base)))

    def set_perms(self, caller: Caller, path: str, perms: tuple[Perm, ...],
                  tx: Transaction | None = None) -> list[Change]:
        if not perms:
            raise XsError("EINVAL", "no permissions")
        if not caller.privileged and self.quota(caller.domid).exceeded("node-permissions", len(perms)):
            raise XsError("ENOSPC", "too many permissions")
        v = _View(self, caller, tx)
        name = self.canonicalize(caller, path, allow_special=True)
        node = self._get_node(v, name, XS_PERM_WRITE | XS_PERM_OWNER)
        if not caller.privileged and perms[0].domid != node.owner:
            raise XsError("EPERM", "only dom0 may change the owner")
        new = replace(node, perms=perms)
        self._check_size(v, new)
        v.put(name, new)
        v.emit(name, Match.SUBTREE, perms, node.perms, self._perms_of(v, parent_of(name)))
        return v.changes

    # -- transactions

    def transaction_start(self, caller: Caller) -> Transaction:
        """A snapshot for `caller`.  (The transactions quota is per connection: the daemon checks it.)"""
        self.next_generation()
        return Transaction(caller, dict(self.nodes), dict(self.counts))

    def transaction_commit(self, tx: Transaction) -> list[Change]:
        """Apply `tx` if nothing it touched changed meanwhile, else EAGAIN.
        Either way the transaction is finished."""
        if tx.failed:
            raise XsError("ENOMEM", "transaction failed")   # xenstored's answer for a failed one
        for path, (gen, _) in tx.accessed.items():
            cur = self.nodes.get(path)
            if (cur.generation if cur else None) != gen:
                raise XsError("EAGAIN", f"conflict on {path}")
        deltas: dict[int, int] = {}
        for path in tx.modified:
            old, new = self.nodes.get(path), tx.nodes.get(path)
            if old is not None:
                deltas[old.owner] = deltas.get(old.owner, 0) - 1
            if new is not None:
                deltas[new.owner] = deltas.get(new.owner, 0) + 1
        if tx.node_created and not tx.caller.privileged:
            for domid, delta in deltas.items():
                if delta > 0 and domid != 0 and self.quota(domid).exceeded(
                        "nodes", self.counts.get(domid, 0) + delta):
                    raise XsError("ENOSPC", "node quota")
        for path in tx.modified:
            new = tx.nodes.get(path)
            if new is not None:
                self.nodes[path] = replace(new, generation=self.next_generation())
            else:
                self.nodes.pop(path, None)
        for domid, delta in deltas.items():
            self.counts[domid] = self.counts.get(domid, 0) + delta
        changes = []
        for path, match in tx.events.items():
            node = self.nodes.get(path)
            old_perms = tx.accessed.get(path, (None, None))[1]
            parent = self.nodes.get(parent_of(path)) if node else None
            visible = tuple(p for p in (old_perms, node.perms if node else None,
                                        parent.perms if parent else None) if p)
            changes.append(Change(path, match, visible))
        return changes

    # -- domains

    def special_changes(self, name: str, domid: int, with_plain: bool = True,
                        with_domid: bool = True) -> list[Change]:
        """Events for "@introduceDomain"/"@releaseDomain" (fire_special_watches):
        "@name" for watches without a depth, "@name/<domid>" for the others."""
        node = self.nodes.get(name)
        if node is None:
            return []
        changes = []
        if with_plain:
            changes.append(Change(name, Match.NODEPTH, (node.perms,)))
        if with_domid:
            changes.append(Change(f"{name}/{domid}", Match.DEPTH, (node.perms,)))
        return changes

    def remove_domain(self, domid: int) -> list[Change]:
        """A domain went away: delete the nodes it owns (with their subtrees) and
        drop its entries from everyone else's permissions (domain_tree_remove)."""
        v = _View(self, DOM0, None)
        stack = ["/"]
        while stack:
            p = stack.pop()
            node = self.nodes.get(p)
            if node is None:
                continue
            if node.owner == domid and p != "/":
                self._rm_subtree(v, p)
                continue
            self._strip_acl(v, p, node, domid)
            stack.extend(child_path(p, c) for c in reversed(node.children))
        for special in SPECIAL_NODES:
            node = self.nodes.get(special)
            if node is not None:
                self._strip_acl(v, special, node, domid)
        return v.changes

    def _strip_acl(self, v: _View, path: str, node: Node, domid: int) -> None:
        kept = node.perms[:1] + tuple(p for p in node.perms[1:] if p.domid != domid)
        if kept != node.perms:
            v.put(path, replace(node, perms=kept))

    # -- walking

    def walk(self, root: str = "/") -> Iterator[tuple[str, Node]]:
        """Every node from `root` down, parents before children, in child order."""
        stack = [root]
        while stack:
            p = stack.pop()
            node = self.nodes.get(p)
            if node is None:
                continue
            yield p, node
            stack.extend(child_path(p, c) for c in reversed(node.children))

    def check(self) -> list[str]:
        """Consistency problems (CONTROL check): parent/child links, counts."""
        problems = []
        reachable = {p for p, _ in self.walk()} | {s for s in SPECIAL_NODES if s in self.nodes}
        for p in self.nodes:
            if p not in reachable:
                problems.append(f"unreachable node {p}")
        counts: dict[int, int] = {}
        for node in self.nodes.values():
            counts[node.owner] = counts.get(node.owner, 0) + 1
        if {k: c for k, c in counts.items() if c} != {k: c for k, c in self.counts.items() if c}:
            problems.append(f"node counts {self.counts} != {counts}")
        return problems

    # -- persistence

    def to_json(self) -> dict[str, Any]:
        nodes = []
        for path, node in self.nodes.items():
            d: dict[str, Any] = {"path": path, "perms": [str(p) for p in node.perms],
                                 "children": list(node.children), "generation": node.generation}
            try:
                text = node.value.decode("ascii")
                d["value"] = text
            except UnicodeDecodeError:
                d["value_b64"] = base64.b64encode(node.value).decode()
            nodes.append(d)
        return {"version": 1, "generation": self.generation, "quotas": self.quotas.to_json(),
                "domain_quotas": {str(k): q.to_json() for k, q in self.domain_quotas.items()},
                "nodes": nodes}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Store:
        if d.get("version") != 1:
            raise ValueError(f"unknown xenstore state version {d.get('version')!r}")
        store = cls(Quotas.from_json(d.get("quotas", {})))
        store.domain_quotas = {int(k): Quotas.from_json(q) for k, q in d.get("domain_quotas", {}).items()}
        store.nodes = {}
        store.counts = {}
        for n in d["nodes"]:
            value = n["value"].encode("ascii") if "value" in n else base64.b64decode(n["value_b64"])
            node = Node(value, tuple(parse_perm(s) for s in n["perms"]), tuple(n["children"]),
                        int(n["generation"]))
            store.nodes[n["path"]] = node
            store.counts[node.owner] = store.counts.get(node.owner, 0) + 1
        store.generation = max(int(d["generation"]), max((n.generation for n in store.nodes.values()),
                                                         default=0))
        if "/" not in store.nodes:
            raise ValueError("xenstore state has no root node")
        return store


def save_json(path: str | os.PathLike[str], data: dict[str, Any] | str) -> None:
    """Write `data` as JSON (or already serialised) to `path` atomically: temp file,
    fsync, rename, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            if isinstance(data, str):
                f.write(data)
            else:
                json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON saved at `path`, or None if there is no such file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a xenstore state file")
    return data

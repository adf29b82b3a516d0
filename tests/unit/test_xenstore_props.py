"""Property tests: the XenStore tree against a dict of path -> value, and transactions."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxen.xenstore.tree import DOM0, Store, Transaction, XsError, guest, parse_perms

SEGMENTS = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(SEGMENTS, min_size=1, max_size=3).map(lambda s: "/q/" + "/".join(s))
VALUES = st.binary(max_size=8)
OPS = st.one_of(
    st.tuples(st.just("write"), PATHS, VALUES),
    st.tuples(st.just("read"), PATHS, st.none()),
    st.tuples(st.just("rm"), PATHS, st.none()),
    st.tuples(st.just("mkdir"), PATHS, st.none()),
    st.tuples(st.just("dir"), PATHS, st.none()),
)
Op = tuple[str, str, bytes | None]


def parent(p: str) -> str:
    return p.rsplit("/", 1)[0] or "/"


@dataclass
class Model:
    """XenStore as a dict of path -> value: every ancestor of a path exists."""

    d: dict[str, bytes] = field(default_factory=lambda: {"/": b"", "/q": b""})

    def copy(self) -> Model:
        return Model(dict(self.d))

    def apply(self, op: Op) -> object:
        kind, p, v = op
        if kind in ("write", "mkdir"):
            q = p
            while q not in self.d:
                self.d[q] = b""
                q = parent(q)
            if kind == "write":
                assert v is not None
                self.d[p] = v
            return None
        if kind == "read":
            return self.d.get(p, "ENOENT")
        if kind == "dir":
            if p not in self.d:
                return "ENOENT"
            return sorted(k.rsplit("/", 1)[1] for k in self.d if k != p and parent(k) == p)
        # rm
        if p not in self.d:
            return None if parent(p) in self.d else "ENOENT"
        for k in [k for k in self.d if k == p or k.startswith(p + "/")]:
            del self.d[k]
        return None


def run(store: Store, op: Op, tx: Transaction | None = None) -> object:
    kind, p, v = op
    try:
        if kind == "write":
            assert v is not None
            store.write(DOM0, p, v, tx)
        elif kind == "mkdir":
            store.mkdir(DOM0, p, tx)
        elif kind == "rm":
            store.rm(DOM0, p, tx)
        elif kind == "read":
            return store.read(DOM0, p, tx)
        else:
            return sorted(store.directory(DOM0, p, tx))
    except XsError as e:
        return e.name
    return None


def fresh() -> Store:
    s = Store()
    s.mkdir(DOM0, "/q")
    return s


def contents(store: Store) -> dict[str, bytes]:
    return {p: n.value for p, n in store.walk() if p == "/" or p == "/q" or p.startswith("/q/")}


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=40))
def test_tree_matches_dict_model(ops: list[Op]) -> None:
    store, model = fresh(), Model()
    for op in ops:
        assert run(store, op) == model.apply(op), op
    assert contents(store) == model.d
    assert store.check() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(OPS, max_size=30))
def test_transaction_alone_commits_like_direct_ops(ops: list[Op]) -> None:
    store, model = fresh(), Model()
    tx = store.transaction_start(DOM0)
    for op in ops:
        assert run(store, op, tx) == model.apply(op), op
    assert contents(store) == Model().d               # nothing visible before commit
    store.transaction_commit(tx)
    assert contents(store) == model.d
    assert store.check() == []


@settings(max_examples=200, deadline=None)
@given(PATHS, VALUES, VALUES, st.lists(OPS, max_size=5), st.lists(OPS, max_size=5), st.booleans())
def test_two_transactions_on_one_node(path: str, v1: bytes, v2: bytes, pre1: list[Op], pre2: list[Op],
                                      read_first: bool) -> None:
    """Both transactions touch `path`: exactly one commits, the other gets EAGAIN, its retry works."""
    store = fresh()
    store.write(DOM0, path, b"start")
    t1, t2 = store.transaction_start(DOM0), store.transaction_start(DOM0)
    for op in pre1:
        run(store, op, t1)
    for op in pre2:
        run(store, op, t2)
    for tx, v in ((t1, v1), (t2, v2)):
        if read_first:
            run(store, ("read", path, None), tx)
        store.write(DOM0, path, v, tx)
    store.transaction_commit(t1)
    assert store.read(DOM0, path) == v1
    try:
        store.transaction_commit(t2)
        raise AssertionError("second commit should conflict")
    except XsError as e:
        assert e.name == "EAGAIN"
    # retry, as xenstore-write does
    t2 = store.transaction_start(DOM0)
    for op in pre2:
        run(store, op, t2)
    store.write(DOM0, path, v2, t2)
    store.transaction_commit(t2)
    assert store.read(DOM0, path) == v2
    assert store.check() == []


STEP = st.one_of(st.tuples(st.sampled_from(["direct", "t1", "t2"]), OPS),
                 st.tuples(st.sampled_from(["commit1", "commit2", "abort1"]), st.none()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, max_size=40))
def test_interleaved_transactions_are_serializable(steps: list[tuple[str, Op | None]]) -> None:
    """A commit that succeeds is the same as running its operations, in order, at commit time
    (including what its reads returned); one that fails with EAGAIN changes nothing."""
    store, model = fresh(), Model()
    txs: dict[str, tuple[Transaction, list[tuple[Op, object]]]] = {}
    for who, op in steps:
        if who == "direct":
            assert op is not None
            assert run(store, op) == model.apply(op)
        elif who in ("t1", "t2"):
            assert op is not None
            if who not in txs:
                txs[who] = (store.transaction_start(DOM0), [])
            tx, log = txs[who]
            log.append((op, run(store, op, tx)))
        else:
            name = "t" + who[-1]
            if name not in txs:
                continue
            tx, log = txs.pop(name)
            if who.startswith("abort"):
                continue
            before = contents(store)
            try:
                store.transaction_commit(tx)
            except XsError as e:
                assert e.name == "EAGAIN"
                assert contents(store) == before
                continue
            for op, seen in log:
                assert model.apply(op) == seen, (op, seen)
            assert contents(store) == model.d
    assert contents(store) == model.d
    assert store.check() == []


GUEST_OPS = st.tuples(st.sampled_from(["write", "mkdir", "rm", "perms"]),
                      st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join),
                      st.sampled_from([5, 6]))


@settings(max_examples=200, deadline=None)
@given(st.lists(GUEST_OPS, max_size=40), st.integers(3, 12))
def test_guest_accounting_and_quota_invariants(ops: list[tuple[str, str, int]], quota: int) -> None:
    """Whatever two guests do, node counts match the owners in the tree and stay within quota."""
    store = Store()
    store.quotas.nodes = quota
    for d in (5, 6):
        store.mkdir(DOM0, f"/local/domain/{d}")
        store.set_perms(DOM0, f"/local/domain/{d}", parse_perms([f"n{d}", "b6" if d == 5 else "r5"]))
    for kind, rel, d in ops:
        path = f"/local/domain/5/{rel}"
        try:
            if kind == "write":
                store.write(guest(d), path, b"v")
            elif kind == "mkdir":
                store.mkdir(guest(d), path)
            elif kind == "rm":
                store.rm(guest(d), path)
            else:
                store.set_perms(guest(d), path, parse_perms([f"n{d}", "r5"]))
        except XsError as e:
            assert e.name in ("ENOENT", "EACCES", "ENOSPC", "EPERM")
        assert store.check() == []
        for g in (5, 6):
            assert store.node_count(g) < quota or store.node_count(g) == 1

"""XenStore tree: paths, permissions, quotas, rm, watches and transactions, as xenstored behaves."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyxen.xenstore.tree import (
    DOM0,
    DOMID_ANY,
    XS_PERM_NONE,
    XS_PERM_READ,
    XS_PERM_WRITE,
    Caller,
    Change,
    Match,
    Perm,
    Quotas,
    Store,
    Watch,
    XsError,
    format_perms,
    guest,
    is_child,
    load_json,
    parent_of,
    parse_perms,
    save_json,
    watch_permitted,
)


def err(fn: object, *args: object) -> str:
    with pytest.raises(XsError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.name


@pytest.fixture
def store() -> Store:
    s = Store()
    s.mkdir(DOM0, "/local/domain/5")
    s.set_perms(DOM0, "/local/domain/5", (Perm(5, XS_PERM_NONE),))
    s.mkdir(DOM0, "/local/domain/6")
    s.set_perms(DOM0, "/local/domain/6", (Perm(6, XS_PERM_NONE),))
    return s


# -- paths


def test_initial_tree() -> None:
    s = Store()
    assert s.directory(DOM0, "/") == ("tool",)
    assert s.directory(DOM0, "/tool") == ("xenstored",)
    assert s.get_perms(DOM0, "@releaseDomain") == (Perm(0, 0), Perm(DOMID_ANY, XS_PERM_READ))
    assert s.get_perms(DOM0, "@introduceDomain") == (Perm(0, 0),)
    assert s.check() == []


@pytest.mark.parametrize("path", ["", "/a/", "//a", "/a//b", "/a b", "/a.b", "/a\0", "@foo", "/ä"])
def test_bad_paths_einval(path: str) -> None:
    assert err(Store().write, DOM0, path, b"x") == "EINVAL"


def test_relative_paths_are_under_the_home(store: Store) -> None:
    g = guest(5)
    store.write(g, "device/vif", b"1")
    assert store.read(DOM0, "/local/domain/5/device/vif") == b"1"
    assert store.read(g, "device/vif") == b"1"
    store.write(DOM0, "rel", b"0")          # dom0's home is /local/domain/0
    assert store.read(DOM0, "/local/domain/0/rel") == b"0"


def test_path_length_limits(store: Store) -> None:
    g = guest(5)
    ok = "/".join(["a" * 99] * 20) + "/" + "b" * 47
    assert len(ok) == 2047
    store.write(g, ok, b"")                 # 2047 bytes after /local/domain/5/
    assert err(store.write, g, ok + "c", b"") == "EINVAL"
    # a 2047-byte child name would make the parent's child list too big for the node-size quota
    assert err(store.write, g, "a" * 2047, b"") == "ENOSPC"
    # dom0 is not bound by the relative limit, but by XENSTORE_ABS_PATH_MAX
    store.write(DOM0, "/" + "b" * 3071, b"")
    assert err(store.write, DOM0, "/" + "b" * 3072, b"") == "EINVAL"


def test_parent_and_is_child() -> None:
    assert parent_of("/a/b") == "/a" and parent_of("/a") == "/" and parent_of("@x") == "/"
    assert is_child("/a/b", "/a") and is_child("/a", "/a") and not is_child("/ab", "/a")
    assert is_child("/a", "/") and is_child("/a/b/c", "/")
    assert is_child("/a/b", "/a", 1) and not is_child("/a/b/c", "/a", 1) and not is_child("/a/b", "/a", 0)
    # "/" counts as one level already (watch.c is_child)
    assert not is_child("/a", "/", 0) and is_child("/a", "/", 1) and not is_child("/a/b", "/", 1)
    assert is_child("@releaseDomain/5", "@releaseDomain", 1)


# -- permissions


def test_perm_strings() -> None:
    perms = parse_perms(["w0", "r1", "b0x10", "n-1"])
    assert format_perms(perms) == b"w0\0r1\0b16\0n-1\0"
    for bad in ["", "x1", "r", "r1x", "r 1 "]:
        assert err(parse_perms, [bad]) == "EINVAL"


def test_owner_default_and_acl(store: Store) -> None:
    store.write(DOM0, "/p", b"v")
    store.set_perms(DOM0, "/p", parse_perms(["n5", "r6"]))
    assert store.read(guest(5), "/p") == b"v"          # owner
    store.write(guest(5), "/p", b"w")                  # owner writes
    assert store.read(guest(6), "/p") == b"w"          # ACL entry: read
    assert err(store.write, guest(6), "/p", b"x") == "EACCES"
    assert err(store.read, guest(7), "/p") == "EACCES"  # default: n
    store.set_perms(DOM0, "/p", parse_perms(["r5"]))
    assert store.read(guest(7), "/p") == b"w"          # default: r
    store.set_perms(DOM0, "/p", parse_perms(["n0", f"b{DOMID_ANY}"]))
    store.write(guest(9), "/p", b"any")                # DOMID_ANY entry


def test_enoent_becomes_eacces_without_parent_permission(store: Store) -> None:
    g = guest(6)
    assert err(store.read, g, "/local/domain/5/nope") == "EACCES"   # can't see inside dom5
    assert err(store.read, g, "/local/domain/6/nope") == "ENOENT"
    store.write(DOM0, "/local/domain/6/sub/x", b"1")
    store.set_perms(DOM0, "/local/domain/6/sub/x", parse_perms(["n0"]))
    assert err(store.read, g, "/local/domain/6/sub/x") == "EACCES"


def test_implicit_parents_inherit_and_guest_owns(store: Store) -> None:
    store.set_perms(DOM0, "/local/domain/5", parse_perms(["n5", "r0", "r7"]))
    store.write(guest(5), "a/b/c", b"1")
    for p in ("a", "a/b", "a/b/c"):
        assert store.get_perms(DOM0, f"/local/domain/5/{p}") == parse_perms(["n5", "r0", "r7"])
    assert store.read(guest(5), "a/b") == b""
    # dom0 creating inherits the owner as well (construct_node)
    store.write(DOM0, "/local/domain/5/d/e", b"")
    assert store.get_perms(DOM0, "/local/domain/5/d/e")[0] == Perm(5, XS_PERM_NONE)
    store.write(DOM0, "/x/y", b"")
    assert store.get_perms(DOM0, "/x/y") == (Perm(0, 0),)


def test_set_perms_rules(store: Store) -> None:
    g = guest(5)
    store.write(g, "n", b"")
    store.set_perms(g, "n", parse_perms(["n5", "r6"]))
    assert err(store.set_perms, g, "n", parse_perms(["n6"])) == "EPERM"    # only dom0 changes owner
    assert err(store.set_perms, guest(6), "/local/domain/5/n", parse_perms(["n5"])) == "EACCES"
    store.set_perms(DOM0, "/local/domain/5/n", parse_perms(["n6"]))
    assert store.node_count(6) == 2 and store.node_count(5) == 1
    assert err(store.set_perms, DOM0, "/nope", parse_perms(["n0"])) == "ENOENT"
    store.set_perms(DOM0, "@releaseDomain", parse_perms(["n0", "r5"]))


def test_target_domain_acts_for_its_target(store: Store) -> None:
    dm = Caller(9, False, target=5)
    store.write(guest(5), "x", b"1")
    assert store.read(dm, "/local/domain/5/x") == b"1"
    store.write(dm, "/local/domain/5/y", b"2")


# -- rm, mkdir


def test_rm_semantics(store: Store) -> None:
    store.write(DOM0, "/a/b/c", b"1")
    store.rm(DOM0, "/a/b/nope")                        # gone, parent exists: fine
    assert err(store.rm, DOM0, "/a/x/y") == "ENOENT"   # parent missing
    assert err(store.rm, DOM0, "/") == "EINVAL"
    assert err(store.rm, guest(5), "/a") == "EACCES"
    store.rm(DOM0, "/a")
    assert err(store.read, DOM0, "/a/b/c") == "ENOENT"
    assert "a" not in store.directory(DOM0, "/")
    assert store.check() == []


def test_mkdir_keeps_value_and_needs_write(store: Store) -> None:
    store.write(DOM0, "/m", b"keep")
    store.mkdir(DOM0, "/m")
    assert store.read(DOM0, "/m") == b"keep"
    assert err(store.mkdir, guest(5), "/m") == "EACCES"


def test_children_keep_creation_order(store: Store) -> None:
    for name in ["z", "a", "m"]:
        store.write(DOM0, f"/o/{name}", b"")
    assert store.directory(DOM0, "/o") == ("z", "a", "m")
    store.rm(DOM0, "/o/a")
    store.write(DOM0, "/o/a", b"")
    assert store.directory(DOM0, "/o") == ("z", "m", "a")


# -- quotas


def test_node_quota_enospc(store: Store) -> None:
    store.quotas.nodes = 10
    g = guest(5)
    assert store.node_count(5) == 1                   # /local/domain/5 itself
    for i in range(8):                                # count + 1 >= 10 fails: 9 nodes
        store.write(g, f"n{i}", b"")
    assert err(store.write, g, "n8", b"") == "ENOSPC"
    assert err(store.write, g, "deep/er", b"") == "ENOSPC"
    store.write(g, "n0", b"overwrite is fine")
    store.rm(g, "n0")
    store.write(g, "n8", b"")
    store.write(DOM0, "/local/domain/5/dom0-is-exempt", b"")
    assert store.check() == []


def test_node_size_quota(store: Store) -> None:
    g = guest(5)
    # 16 header + 8 per permission + value: the default limit is 2048, exceeded at >= 2048
    store.write(g, "big", b"x" * (2048 - 16 - 8 - 1))
    assert err(store.write, g, "big", b"x" * (2048 - 16 - 8)) == "ENOSPC"
    store.write(DOM0, "/local/domain/5/big", b"x" * 4000)   # dom0 is exempt


def test_permission_count_quota(store: Store) -> None:
    g = guest(5)
    store.write(g, "p", b"")
    store.set_perms(g, "p", parse_perms(["n5", "r1", "r2", "r3"]))
    assert err(store.set_perms, g, "p", parse_perms(["n5", "r1", "r2", "r3", "r4"])) == "ENOSPC"


def test_quota_names() -> None:
    q = Quotas()
    assert [q.get(n) for n in Quotas.NAMES] == [1000, 128, 20, 2621440, 10, 1024, 5, 2048, 2048]
    assert q.exceeded("nodes", 1000) and not q.exceeded("nodes", 999)
    q.set("nodes", 0)
    assert not q.exceeded("nodes", 10**6)
    assert err(q.set, "bogus", 1) == "EINVAL"


# -- watches


def watched(changes: list[Change], w: Watch) -> list[str]:
    return [w.event_path(c.path) for c in changes if w.fires_for(c)]


def test_watch_matching(store: Store) -> None:
    w = Watch("/a", "t")
    assert watched(store.write(DOM0, "/a/b/c", b""), w) == ["/a/b/c"]   # only the written node
    assert watched(store.write(DOM0, "/ab", b""), w) == []
    assert watched(store.write(DOM0, "/a", b"1"), w) == ["/a"]
    shallow = Watch("/a", "t", depth=1)
    assert watched(store.write(DOM0, "/a/b", b""), shallow) == ["/a/b"]
    assert watched(store.write(DOM0, "/a/b/c", b"x"), shallow) == []
    root = Watch("/", "t")
    assert watched(store.write(DOM0, "/q", b""), root) == ["/q"]


def test_rm_fires_exact_below_and_subtree_at_top(store: Store) -> None:
    store.write(DOM0, "/a/b/c", b"")
    store.write(DOM0, "/a/d", b"")
    changes = store.rm(DOM0, "/a")
    assert [(c.path, c.match) for c in changes] == [
        ("/a/b/c", Match.EXACT), ("/a/b", Match.EXACT), ("/a/d", Match.EXACT), ("/a", Match.SUBTREE)]
    assert watched(changes, Watch("/a/b/c", "t")) == ["/a/b/c"]      # a watched node below goes
    assert watched(changes, Watch("/a", "t")) == ["/a"]
    assert watched(changes, Watch("/", "t")) == ["/a"]
    assert watched(changes, Watch("/a/x", "t")) == []                # nothing was there


def test_relative_watch_event_paths() -> None:
    w = Watch("/local/domain/5/data", "t", prefix_len=len("/local/domain/5/"))
    assert w.event_path("/local/domain/5/data/x") == "data/x"


def test_watch_permissions(store: Store) -> None:
    store.write(DOM0, "/local/domain/5/secret", b"")
    store.set_perms(DOM0, "/local/domain/5/secret", parse_perms(["n0"]))
    (c,) = store.write(DOM0, "/local/domain/5/secret", b"1")
    # guest 5 may read the parent, so it hears about the node (watch_permitted)
    assert watch_permitted(guest(5), c)
    assert not watch_permitted(guest(6), c)
    assert watch_permitted(DOM0, c)
    # a permission change is seen by who could read before or after
    store.write(DOM0, "/pub", b"")
    store.set_perms(DOM0, "/pub", parse_perms(["n0", "r6"]))
    (c,) = store.set_perms(DOM0, "/pub", parse_perms(["n0"]))
    assert watch_permitted(guest(6), c)


def test_special_watch_events(store: Store) -> None:
    changes = store.special_changes("@releaseDomain", 7)
    assert watched(changes, Watch("@releaseDomain", "t")) == ["@releaseDomain"]
    assert watched(changes, Watch("@releaseDomain", "t", depth=1)) == ["@releaseDomain/7"]
    assert watched(changes, Watch("@releaseDomain/7", "t")) == ["@releaseDomain/7"]
    assert watched(changes, Watch("@releaseDomain/8", "t")) == []
    # @releaseDomain is readable by all domains (DOMID_ANY), @introduceDomain only by dom0
    assert all(watch_permitted(guest(5), c) for c in changes)
    assert not any(watch_permitted(guest(5), c) for c in store.special_changes("@introduceDomain", 7))


# -- transactions


def test_transaction_snapshot_and_commit(store: Store) -> None:
    store.write(DOM0, "/t/x", b"0")
    tx = store.transaction_start(DOM0)
    store.write(DOM0, "/t/y", b"new", tx)
    store.write(DOM0, "/t/z", b"other")                # outside, untouched by tx
    assert store.read(DOM0, "/t/y", tx) == b"new"
    assert err(store.read, DOM0, "/t/y") == "ENOENT"     # not visible until commit
    assert err(store.read, DOM0, "/t/z", tx) == "ENOENT"  # snapshot
    # /t changed outside (z was added) and tx added y to /t too: conflict
    assert err(store.transaction_commit, tx) == "EAGAIN"
    tx = store.transaction_start(DOM0)
    store.write(DOM0, "/t/y", b"new", tx)
    changes = store.transaction_commit(tx)
    assert [c.path for c in changes] == ["/t/y"]
    assert store.read(DOM0, "/t/y") == b"new"
    assert store.check() == []


def test_transactions_on_disjoint_nodes_both_commit(store: Store) -> None:
    store.write(DOM0, "/d/a", b"")
    store.write(DOM0, "/d/b", b"")
    t1, t2 = store.transaction_start(DOM0), store.transaction_start(DOM0)
    store.write(DOM0, "/d/a", b"1", t1)
    store.write(DOM0, "/d/b", b"2", t2)
    store.transaction_commit(t1)
    store.transaction_commit(t2)
    assert (store.read(DOM0, "/d/a"), store.read(DOM0, "/d/b")) == (b"1", b"2")


def test_read_only_conflict_and_rm_in_transaction(store: Store) -> None:
    store.write(DOM0, "/r/a", b"1")
    tx = store.transaction_start(DOM0)
    assert store.read(DOM0, "/r/a", tx) == b"1"
    store.write(DOM0, "/r/out", b"", tx)
    store.rm(DOM0, "/r/a")                             # what tx read is gone
    assert err(store.transaction_commit, tx) == "EAGAIN"
    store.write(DOM0, "/r/a/b/c", b"1")
    tx = store.transaction_start(DOM0)
    changes = store.rm(DOM0, "/r/a", tx)
    assert changes == [] and store.read(DOM0, "/r/a/b/c") == b"1"
    fired = store.transaction_commit(tx)
    assert {(c.path, c.match) for c in fired} == {("/r/a", Match.SUBTREE), ("/r/a/b", Match.EXACT),
                                                  ("/r/a/b/c", Match.EXACT)}
    assert err(store.read, DOM0, "/r/a/b") == "ENOENT"
    assert store.check() == []


def test_transaction_node_quota_checked_at_commit(store: Store) -> None:
    store.quotas.nodes = 5
    g = guest(5)
    t1, t2 = store.transaction_start(g), store.transaction_start(g)
    store.write(g, "a/b", b"", t1)                     # 1 + 2 nodes: fine
    store.write(g, "c", b"", t2)
    store.transaction_commit(t1)
    store.write(g, "d", b"")                           # now 4: the next one fails
    assert err(store.transaction_commit, t2) in ("EAGAIN", "ENOSPC")
    t3 = store.transaction_start(g)
    assert err(store.write, g, "e", b"", t3) == "ENOSPC"


def test_transaction_nodes_quota_fails_the_transaction(store: Store) -> None:
    store.quotas.transaction_nodes = 4
    g = guest(5)
    tx = store.transaction_start(g)
    store.write(g, "a", b"", tx)                       # touches a and /local/domain/5
    assert err(store.write, g, "b/c/d", b"", tx) == "ENOSPC"
    assert err(store.transaction_commit, tx) == "ENOMEM"   # xenstored's answer for a failed transaction


def test_nested_snapshots_are_independent(store: Store) -> None:
    t1 = store.transaction_start(DOM0)
    store.write(DOM0, "/n/x", b"1", t1)
    t2 = store.transaction_start(DOM0)
    assert err(store.read, DOM0, "/n/x", t2) == "ENOENT"
    store.transaction_commit(t1)
    assert err(store.read, DOM0, "/n/x", t2) == "ENOENT"


# -- domains


def test_remove_domain(store: Store) -> None:
    g = guest(5)
    store.write(g, "data/x", b"1")
    store.write(DOM0, "/shared", b"")
    store.set_perms(DOM0, "/shared", parse_perms(["n0", "r5", "w6"]))
    store.write(DOM0, "/mine", b"")
    store.set_perms(DOM0, "/mine", parse_perms(["b5"]))
    store.write(DOM0, "/mine/theirs", b"")
    store.set_perms(DOM0, "@releaseDomain", parse_perms(["n0", "r5"]))
    changes = store.remove_domain(5)
    assert err(store.read, DOM0, "/local/domain/5") == "ENOENT"
    assert err(store.read, DOM0, "/mine/theirs") == "ENOENT"     # subtree of a node 5 owned
    assert store.get_perms(DOM0, "/shared") == parse_perms(["n0", "w6"])
    assert store.get_perms(DOM0, "@releaseDomain") == parse_perms(["n0"])
    assert "/local/domain/5" in [c.path for c in changes]
    assert store.node_count(5) == 0
    assert store.check() == []


# -- persistence


def test_save_and_load_roundtrip(store: Store, tmp_path: Path) -> None:
    store.write(DOM0, "/bin", bytes(range(256)))
    store.write(guest(5), "txt", b"hello")
    store.set_perms(DOM0, "/bin", parse_perms(["r5", "w6", "b0"]))
    store.write(DOM0, "/order/z", b"")
    store.write(DOM0, "/order/a", b"")
    store.quotas.nodes = 77
    f = tmp_path / "state.json"
    save_json(f, store.to_json())
    data = load_json(f)
    assert data is not None
    s2 = Store.from_json(data)
    assert s2.nodes == store.nodes and s2.counts == store.counts and s2.quotas.nodes == 77
    assert s2.directory(DOM0, "/order") == ("z", "a")
    s2.write(DOM0, "/after", b"")
    assert s2.get("/after") is not None and s2.get("/after").generation > store.generation  # type: ignore[union-attr]
    assert load_json(tmp_path / "missing.json") is None
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]     # no temp files left


def test_perm_bits() -> None:
    assert Perm(1, XS_PERM_READ | XS_PERM_WRITE).__str__() == "b1"
    assert str(Perm(0xFFFFFFFF, XS_PERM_WRITE)) == "w-1"

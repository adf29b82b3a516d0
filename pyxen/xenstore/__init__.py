"""XenStore: the tree (tree.py), the wire protocol (wire.py) and the daemon (server.py).

See docs/xenstore.md.
"""

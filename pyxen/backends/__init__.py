"""Backends: the host side of split drivers (console now; block and net later)."""

"""pyxen: the Xen hypervisor (x86_64 PV model) in Python on Linux KVM."""

__version__ = "0.1.0"

"""Save, restore and live relocation (issue 11): Xen's migration stream."""

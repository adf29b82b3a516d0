"""The hypervisor proper: domains, vCPUs, hypercalls, PV MMU, events, time."""

"""The lease store (service/work/leases.py's `LeaseStore`) of each log backend, a module each
named after it, holding all of that backend's SQL for leases."""

"""Redis: the queue, the event streams, cancel flags and capacity leases."""

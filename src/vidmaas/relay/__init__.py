"""The relay role: applies events to the database, frees capacity, sends webhooks.

Its parts: ``relay.service`` (``Relay(services, consumer_name=...)``: the loops over
the consumer group, whose Redis side is ``bus.consumer``), ``relay.apply`` (what an
event does to its task row) and ``relay.webhooks`` (recording and sending webhooks).
Nothing is started at import time.
"""

"""The relay role: applies events to the database, frees capacity, sends webhooks.

``Relay(services, consumer_name=...)`` consumes the global event stream; see
``vidmaas.relay.service``. Webhook recording and sending live in
``vidmaas.relay.webhooks``. Nothing is started at import time.
"""

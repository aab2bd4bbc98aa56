"""Object storage behind one interface: S3 (any S3-compatible service) or a local directory."""

from vidmaas.storage.base import ObjectStore
from vidmaas.storage.factory import open_store, store_from_settings

__all__ = ["ObjectStore", "open_store", "store_from_settings"]

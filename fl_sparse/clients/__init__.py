"""Client side: :class:`SparseMod` (any ClientApp) and the built-in experiments' ClientApp."""

from fl_sparse.clients.mod import SparseMod, SyncError

__all__ = ["SparseMod", "SyncError"]

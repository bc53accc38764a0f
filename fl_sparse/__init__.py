"""fl-sparse: communication-efficient federated learning with Flower.

Gradient sparsifiers (top-K, rTop-k, hard threshold, AdapTop-K, majority-vote
masks) as ordinary Flower strategies and ClientApps.
"""

from fl_sparse.sparse import SparseTensor

__all__ = ["SparseTensor", "__version__"]
__version__ = "0.1.0"

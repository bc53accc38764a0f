"""sparse_quickstart: a Flower / PyTorch app whose updates travel top-K sparsified."""

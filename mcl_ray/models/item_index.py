"""The nearest-neighbour index of item vectors (retrieval's second half), built with faiss.

Exact inner-product search (IndexFlatIP) below `retrieval.exact_below` items; HNSW above it, where
exact search costs a full scan per request (0.8 ms per 100k x 64-d on one core). Both return
positions into the catalogue order they were built from (faiss ids), and both live in one file
format that faiss reads memory-mapped. The vectors are unit norm, so inner product = cosine.

faiss ships its own OpenMP runtime, which ignores torch.set_num_threads: a serving replica that
owns one core must say so here too (`threads`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# torch before faiss: both bring an OpenMP runtime, and this order is the one that loads cleanly
import torch  # noqa: F401  (import order only)
import faiss  # noqa: E402

INDEX = "items.faiss"


class ItemIndex:
    def __init__(self, index: faiss.Index, kind: str):
        self.index, self.kind = index, kind

    @classmethod
    def build(cls, vectors: np.ndarray, exact_below: int = 200_000, hnsw_m: int = 32, ef_construction: int = 200,
              ef_search: int = 512) -> "ItemIndex":
        """vectors [I, E] float32, row i = catalogue position i."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        n, dim = vectors.shape
        if n < exact_below:
            index, kind = faiss.IndexFlatIP(dim), "exact"
        else:
            index, kind = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT), "hnsw"
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        index.add(vectors)
        return cls(index, kind)

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "ItemIndex":
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        return cls(index, "hnsw" if isinstance(index, faiss.IndexHNSW) else "exact")

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (scores [Q, n'], positions [Q, n']) best first, n' = min(n, items). HNSW searches with at
        least n candidates in its list (efSearch below n would cap recall)."""
        n = min(n, len(self))
        if n <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(n, faiss.downcast_index(self.index).hnsw.efSearch))
            scores, pos = self.index.search(np.ascontiguousarray(queries, np.float32), n, params=params)
        else:
            scores, pos = self.index.search(np.ascontiguousarray(queries, np.float32), n)
        return scores, pos

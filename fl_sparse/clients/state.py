"""Where a client keeps what must outlive one message: its model copy and error memory.

Why not ``context.state``? Flower pickles the whole Context into the Ray
actor and back with every message. For 100 clients x ResNet-18 (two 44 MB
vectors each: model copy and error memory) that is ~90 MB of pickling per
message and ~9 GB held by the simulation engine. A SuperNode restart also
loses ``context.state``.

:class:`ClientStateStore` keeps one file per client under a directory:

* simulation: ``<state-dir>/<run-id>/client-<partition-id>.pt``; the server
  picks ``state-dir`` (a temporary folder by default) and removes it after the
  run;
* deployment: the SuperNode's ``--node-config "state-dir='/var/lib/fl-sparse'"``
  (or the ``FL_SPARSE_STATE_DIR`` environment variable) names a persistent
  folder, so the memory survives a SuperNode restart.

Writes are atomic (write to a temporary file, fsync, ``os.replace``): a crash
while saving leaves the previous round's state, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["ClientState", "ClientStateStore", "StateCorruptError"]


class StateCorruptError(RuntimeError):
    """A stored client state could not be read back."""


@dataclass
class ClientState:
    """Everything a client remembers between rounds.

    ``model`` is the client's copy of the global model at ``model_version``
    (``None`` before the first dense sync); ``error`` is the error-feedback
    memory; ``steps_done`` counts local SGD steps so data order continues
    across rounds; ``extra`` holds strategy-specific tensors (e.g. the
    previous vote of SSGD-MV-AD).
    """

    model: torch.Tensor | None = None
    model_version: int = -1
    error: torch.Tensor | None = None
    steps_done: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_payload(self) -> dict:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "error": self.error,
            "steps_done": self.steps_done,
            "extra": self.extra,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> "ClientState":
        return cls(
            model=payload.get("model"),
            model_version=int(payload.get("model_version", -1)),
            error=payload.get("error"),
            steps_done=int(payload.get("steps_done", 0)),
            extra=dict(payload.get("extra") or {}),
        )


class ClientStateStore:
    """One atomic file per client under ``root``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in key)
        return self.root / f"{safe}.pt"

    def load(self, key: str) -> ClientState:
        """The stored state, or a fresh one if there is none yet."""
        path = self.path(key)
        if not path.exists():
            return ClientState()
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torn or foreign file: say which and why
            raise StateCorruptError(f"cannot read client state {path}: {exc}") from exc
        return ClientState.from_payload(payload)

    def save(self, key: str, state: ClientState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state.to_payload(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

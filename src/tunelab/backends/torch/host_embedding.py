"""A frozen input-embedding table kept in pinned CPU memory instead of on the GPU.

Adapter methods (LoRA, DoRA, QLoRA) never train the input embeddings, and a
forward reads only the rows of the batch's tokens: for a 128k vocabulary at
hidden 4,096 the table is 1 GiB of GPU memory (an 8B Llama's 4-bit QLoRA base
is 5.3 GiB in all) for 32 MiB of rows per 4,096 tokens.  So the table stays in
host memory, the rows are gathered there and copied in.

The gather runs on the host copy of the batch before the batch reaches the GPU
(:meth:`HostEmbedding.prime`), so the forward finds the rows already on their
way and the step waits for nothing; a forward whose ids were not primed
(generation, a caller with its own tensors) gathers from a host copy of its
ids, which waits for the GPU once.  The numbers are the same either way: the
same rows of the same table, in the same dtype.

Training goes one further: the loader's helper thread gathers each micro-batch's
rows while the step before it runs (:meth:`HostEmbedding.prepare`), and the
step only copies them in.  A QLoRA step on a GPU waits on its host, and the
gather (4,096 rows of 8 KiB at 8B) took milliseconds of the training thread's
time (bench/README, session 49); ``index_select`` releases the GIL, so on the
helper thread it costs the step nothing.

Only a plain ``torch.nn.Embedding`` not shared with the LM head qualifies:
tied tables are read whole by the head, and subclasses (Gemma's scaled
embedding) do more than look rows up.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np
import torch

# Micro-batches gathered ahead and not yet claimed by a step, at most, whatever the loader says may wait: the
# loader prepares the next step's while this one's are in use, and a step whose rows are gone gathers them.
PREPARED_AT_MOST = 64


class HostEmbedding(torch.nn.Module):
    """Looks token ids up in a table held in pinned CPU memory; rows come back on ``device``.

    The table is a plain attribute, neither parameter nor buffer, so moving the
    model (``.to``) leaves it where it is and optimizers never see it.
    """

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device) -> None:
        super().__init__()
        weight = embedding.weight.detach()
        self.table = weight.to("cpu").pin_memory() if device.type == "cuda" else weight.to("cpu")
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.padding_idx = embedding.padding_idx
        self.device = device
        self._primed: tuple[torch.Tensor, torch.Tensor] | None = None  # (device ids, their rows on device)
        # (host ids, their rows in host memory) gathered ahead on the loader's thread, oldest first
        self._prepared: deque[tuple[np.ndarray, torch.Tensor]] = deque()
        self._lock = threading.Lock()

    @property
    def weight(self) -> torch.Tensor:
        """The table, for code that reads the embedding's shape or dtype (PEFT, transformers)."""
        return self.table

    def prepare(self, host_ids: np.ndarray, waiting: int) -> None:
        """Gather ``host_ids``' rows into (pinned) host memory now, for the :meth:`prime` given the same ids.

        Thread-safe: the training loop's batch-loading thread calls it ahead of each step.  ``waiting``:
        how many prepared micro-batches may wait at once; past that (or :data:`PREPARED_AT_MOST`) the
        oldest are dropped.
        """
        ids = np.array(host_ids, copy=True)  # the caller's array may be reused
        rows = self._host_rows(torch.from_numpy(ids))
        with self._lock:
            self._prepared.append((ids, rows))
            while len(self._prepared) > max(1, min(waiting, PREPARED_AT_MOST)):
                self._prepared.popleft()

    def prime(self, host_ids: np.ndarray | torch.Tensor, device_ids: torch.Tensor) -> None:
        """Start copying ``host_ids``' rows (gathered ahead, else now); the forward given ``device_ids`` uses them."""
        rows = self._claim(np.asarray(host_ids))
        if rows is None:
            rows = self._host_rows(torch.as_tensor(host_ids))
        self._primed = (device_ids, self._moved(rows, tuple(host_ids.shape)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        primed = self._primed
        if primed is not None and primed[0] is ids:
            rows = primed[1]
        else:
            rows = self._gather(ids.to("cpu"))
        return rows.detach()  # a fresh leaf each call: a forward hook may ask it for a gradient

    def _claim(self, ids: np.ndarray) -> torch.Tensor | None:
        """The rows :meth:`prepare` gathered for these very ids (taken off the list), or None."""
        with self._lock:
            for index, (ready, rows) in enumerate(self._prepared):
                if ready.shape == ids.shape and np.array_equal(ready, ids):
                    for _ in range(index + 1):  # and those prepared before it, which no step will claim now
                        self._prepared.popleft()
                    return rows
        return None

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self._moved(self._host_rows(ids), tuple(ids.shape))

    def _host_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids' rows, one per id in order, in host memory (pinned where they go to a GPU)."""
        flat = ids.reshape(-1).to(torch.long)
        pinned = self.device.type == "cuda"
        rows = torch.empty((flat.numel(), self.embedding_dim), dtype=self.table.dtype, pin_memory=pinned)
        return torch.index_select(self.table, 0, flat, out=rows)

    def _moved(self, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        # The caching host allocator keeps a pinned block from reuse until the copy that reads it is done.
        return rows.to(self.device, non_blocking=True).view(*shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in CPU memory"


def host_embedding_applies(base: Any, trainable_embeddings: bool) -> str | None:
    """Why the input embeddings of ``base`` can't stay in CPU memory, or None when they can."""
    if trainable_embeddings:
        return "the method trains the input embeddings"
    embed = base.get_input_embeddings()
    if type(embed) is not torch.nn.Embedding:
        return f"this model's input embedding ({type(embed).__name__}) does more than look rows up"
    head = base.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embed.weight:
        return "this model ties its input embeddings to the LM head, which reads the whole table"
    return None


def move_embeddings_to_host(base: Any, device: torch.device) -> HostEmbedding:
    """Replace ``base``'s input embedding by a :class:`HostEmbedding`; its GPU copy is freed."""
    host = HostEmbedding(base.get_input_embeddings(), device)
    base.set_input_embeddings(host)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return host

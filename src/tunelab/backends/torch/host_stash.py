"""Tensors of one forward parked in pinned CPU memory, per decoder layer, and brought back ahead of backward.

Offloaded checkpoints park each layer's input here and the kept MLP
(:mod:`kept_mlp`) each layer's gate and up projections.  A copy out runs on a
side stream as soon as the tensor is computed, so the next layers' compute
hides it; backward walks the layers in reverse, and fetching layer ``i``'s
tensors starts copying layer ``i - 1``'s back, so that copy too overlaps the
compute in between.  On a CPU run the tensors are already in CPU memory and
are kept as they are (the tests run the same code there), as they are on any
device by a stash made ``on_device`` (checkpoints that offload nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Saved:
    """One layer's tensors in pinned CPU memory, and the event that says their copy is done."""

    cpu: tuple[torch.Tensor, ...]
    done: torch.cuda.Event | None
    prefetched: tuple[tuple[torch.Tensor, ...], torch.cuda.Event | None] | None = None


@dataclass
class HostStash:
    """The parked tensors of one forward's layers, in layer order, and the side stream their copies run on."""

    saved: list[_Saved | None] = field(default_factory=list)
    on_device: bool = False  # keep the tensors where they are (a checkpoint that offloads nothing)
    # Copies out and copies back on streams of their own: the link carries both directions at once, and
    # a prefetch never queues behind a forward's copies out that it doesn't need.
    streams: dict[str, torch.cuda.Stream] = field(default_factory=dict)

    def offload(self, index: int, *tensors: torch.Tensor) -> list[_Saved | None]:
        """Start copying layer ``index``'s tensors out; returns the list that :meth:`fetch` reads them from.

        Layer 0 begins a new forward (micro-batch): the list is a fresh one, so a
        backward still reading the previous list is never disturbed.
        """
        if index == 0:
            self.saved = []
        while len(self.saved) <= index:
            self.saved.append(None)
        device = tensors[0].device
        if not self._copies(device):
            self.saved[index] = _Saved(tuple(t.detach() for t in tensors), None)
            return self.saved
        stream = self._side("out", device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the tensors are computed
        with torch.cuda.stream(stream):
            cpu = tuple(
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors
            )
            done = torch.cuda.Event()
            done.record(stream)
        for t in tensors:
            t.record_stream(stream)  # its memory is not reused before the copy has read it
        self.saved[index] = _Saved(cpu, done)
        return self.saved

    def fetch(self, saved: list[_Saved | None], index: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Layer ``index``'s tensors back on ``device``; starts copying layer ``index - 1``'s meanwhile."""
        entry = saved[index]
        assert entry is not None
        saved[index] = None
        if not self._copies(device):
            return entry.cpu
        current = torch.cuda.current_stream(device)
        if entry.prefetched is not None:
            tensors, ready = entry.prefetched
            if ready is not None:
                current.wait_event(ready)
        else:
            if entry.done is not None:
                current.wait_event(entry.done)
            tensors = tuple(t.to(device, non_blocking=True) for t in entry.cpu)
        if index > 0 and (previous := saved[index - 1]) is not None and previous.prefetched is None:
            stream = self._side("in", device)
            with torch.cuda.stream(stream):
                if previous.done is not None:
                    stream.wait_event(previous.done)
                early = tuple(t.to(device, non_blocking=True) for t in previous.cpu)
                ready = torch.cuda.Event()
                ready.record(stream)
            for t in early:
                t.record_stream(current)  # used on the compute stream: freed only after it is done there
            previous.prefetched = (early, ready)
        return tensors

    def _copies(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` travel to pinned CPU memory (else they are kept as they are)."""
        return device.type == "cuda" and not self.on_device

    def _side(self, direction: str, device: torch.device) -> torch.cuda.Stream:
        if direction not in self.streams:
            self.streams[direction] = torch.cuda.Stream(device)
        return self.streams[direction]


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)

"""Token streaming for the torch backend: transformers' ``generate`` in a worker thread, cancellable."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def stream_tokens(
    model: Any,
    device: torch.device,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: Sequence[int],
    pad_id: int | None,
    seed: int,
) -> Iterator[int]:
    """Stream tokens from transformers' ``generate`` running in a worker thread.

    Closing the iterator early (a stop token, a client that goes away) cancels
    the worker through a stopping criterion and waits for it, so no thread is
    left generating behind the caller's back.
    """

    from transformers import StoppingCriteria, StoppingCriteriaList

    cancel = threading.Event()

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    torch.manual_seed(seed)
    ids = torch.tensor([list(prompt_ids)], device=device)
    tokens: queue.Queue[int | BaseException | None] = queue.Queue()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": max_new_tokens,
        "eos_token_id": list(stop_ids) or None,
        "pad_token_id": pad_id,
        "streamer": _QueueStreamer(tokens),
        "stopping_criteria": StoppingCriteriaList([_Cancelled()]),
        "do_sample": False,
        **sampling,
    }

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced in the consuming thread
            tokens.put(exc)
        finally:
            tokens.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := tokens.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        thread.join()


class _QueueStreamer:
    """The two-method streamer interface transformers' generate calls, feeding a queue."""

    def __init__(self, out: queue.Queue[Any]) -> None:
        self.out = out
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        flat = value.reshape(-1).tolist()
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        for token in flat:
            self.out.put(int(token))

    def end(self) -> None:
        pass

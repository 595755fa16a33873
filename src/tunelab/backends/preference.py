"""Where the sequences of a preference batch are, found on the host (numpy) for both backends.

A preference batch (``tunelab.data.preference``) marks every token with its sequence's role
(``roles``; 0 on padding).  Sequences come in units of two, in order: chosen then rejected for the
pairwise objectives, an example then its KL row for KTO, whether the rows are packed or not.  The
backends score each sequence as the summed log-prob of its labelled tokens: they gather those
tokens' log-probs at :attr:`Layout.positions` and add them up per :attr:`Layout.seq_index`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab.errors import StateError
from tunelab.vocab import IGNORE, ROLE_CHOSEN, ROLE_DESIRABLE, ROLE_KL, ROLE_REJECTED, ROLE_UNDESIRABLE

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Layout:
    """The scored tokens of a preference batch and the sequence each belongs to."""

    positions: np.ndarray  # (N,) flat indices into labels[:, 1:] of the scored targets
    seq_index: np.ndarray  # (N,) the sequence of each scored target, 0 .. S-1 in batch order
    roles: np.ndarray  # (S,) the role of each sequence
    lengths: np.ndarray  # (S,) scored tokens per sequence

    @property
    def units(self) -> int:
        """Pairs (pairwise) or examples (KTO): what the loss is a mean over."""
        return len(self.roles) // 2


def layout(batch: Batch) -> Layout:
    """Find the sequences of ``batch`` (row by row, or segment by segment when packed) and their roles."""
    roles = np.asarray(batch["roles"])
    starts = _starts(roles, batch.get("segment_ids"))
    seq_id = np.cumsum(starts.reshape(-1)).reshape(roles.shape) - 1
    scored = (batch["labels"][:, 1:] != IGNORE) & (roles[:, 1:] != 0)
    positions = np.flatnonzero(scored)
    seq_index = seq_id[:, 1:].reshape(-1)[positions]
    seq_roles = roles.reshape(-1)[np.flatnonzero(starts)]
    _check_units(seq_roles)
    lengths = np.bincount(seq_index, minlength=len(seq_roles))
    return Layout(positions, seq_index, seq_roles, lengths)


def _starts(roles: np.ndarray, segments: np.ndarray | None) -> np.ndarray:
    """Tokens that begin a sequence: the first of a row, a role change, or (packed) a new segment."""
    before = np.pad(roles[:, :-1], ((0, 0), (1, 0)))
    new = roles != before
    new[:, 0] = True
    if segments is not None:
        new[:, 1:] |= segments[:, 1:] != segments[:, :-1]
    return new & (roles != 0)


def _check_units(roles: np.ndarray) -> None:
    firsts, seconds = roles[0::2], roles[1::2]
    pairwise = len(roles) % 2 == 0 and (firsts == ROLE_CHOSEN).all() and (seconds == ROLE_REJECTED).all()
    kto = (
        len(roles) % 2 == 0 and np.isin(firsts, (ROLE_DESIRABLE, ROLE_UNDESIRABLE)).all() and (seconds == ROLE_KL).all()
    )
    if not (pairwise or kto):
        raise StateError("a preference batch is not in units of (chosen, rejected) or (example, KL row)")


def loss_units(batch: Batch) -> int:
    """What a batch's loss is a sum over: its pairs or KTO examples, else its supervised tokens."""
    if "roles" not in batch:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    roles = np.asarray(batch["roles"])
    starts = _starts(roles, batch.get("segment_ids"))
    return int(np.isin(roles[starts], (ROLE_CHOSEN, ROLE_DESIRABLE, ROLE_UNDESIRABLE)).sum())


def host_arrays(batch: Batch) -> dict[str, np.ndarray]:
    """The layout as arrays a backend moves to its device, plus precomputed reference scores if given.

    ``positions``, ``seq_index``, ``seq_lengths`` (float), ``desirable`` (KTO: 1.0 per desirable
    example) and ``ref_seq`` (each sequence's summed reference log-prob, when the batch has ``ref_logps``).
    """
    found = layout(batch)
    out: dict[str, np.ndarray] = {
        "positions": found.positions.astype(np.int64),
        "seq_index": found.seq_index.astype(np.int64),
        "seq_lengths": found.lengths.astype(np.float32),
    }
    if (found.roles[1::2] == ROLE_KL).all() and len(found.roles):
        out["desirable"] = (found.roles[0::2] == ROLE_DESIRABLE).astype(np.float32)
    if "ref_logps" in batch:
        tokens = batch["ref_logps"][:, 1:].reshape(-1)[found.positions]
        out["ref_seq"] = np.bincount(found.seq_index, weights=tokens, minlength=len(found.roles)).astype(np.float32)
    return out


def reduce_stats(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Means of an objective's summed diagnostics, with ``rewards/margin`` = chosen - rejected."""
    out = {name: total / count for name, (total, count) in sums.items() if count}
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def add_stats(into: dict[str, tuple[float, float]], more: dict[str, tuple[float, float]]) -> None:
    """Accumulate ``more`` (sum, count) diagnostics into ``into``."""
    for name, (total, count) in more.items():
        old = into.get(name, (0.0, 0.0))
        into[name] = (old[0] + total, old[1] + count)

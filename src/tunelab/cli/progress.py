"""The terminal view of a training run: a Rich live panel on a TTY, plain lines otherwise."""

from __future__ import annotations

import time
from pathlib import Path

from rich.live import Live
from rich.table import Table

from tunelab.cli.console import err_console
from tunelab.services import BaseCallback

_LIVE_EVERY_S = 0.25  # the live panel's own refresh rate: a newer table would not be shown sooner


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LiveView(BaseCallback):
    """step/total, loss, val loss, lr, tokens/s, ETA and memory, refreshed as metrics arrive."""

    def __init__(self, *, plain: bool | None = None, every_s: float = 2.0) -> None:
        self.plain = (not err_console.is_terminal) if plain is None else plain
        self.every_s = every_s
        self.total = 0
        self.first_step = 0
        self.values: dict[str, float] = {}
        self.step = 0
        self._started = time.perf_counter()
        self._last_print = 0.0
        self._live: Live | None = None

    def on_start(self, *, step: int, total_steps: int) -> None:
        self.total, self.first_step, self.step = total_steps, step, step
        self._started = time.perf_counter()
        if not self.plain:
            self._live = Live(self._table(), console=err_console, refresh_per_second=4, transient=False)
            self._live.start()

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Keep the newest values; draw at most every ``every_s`` seconds (4 times a second on a TTY).

        A small model steps hundreds of times a second: building a table or a line for each would cost
        more than the step.  Validations and the last step are always drawn.
        """
        self.step = step
        self.values.update(metrics)
        now = time.perf_counter()
        every = _LIVE_EVERY_S if self._live is not None else self.every_s
        if "val_loss" not in metrics and step != self.total and now - self._last_print < every:
            return
        self._last_print = now
        if self._live is not None:
            self._live.update(self._table())
        else:
            err_console.print(self._line(), highlight=False, soft_wrap=True)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.on_message(f"checkpoint saved: {path}")

    def on_message(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text)
        else:
            err_console.print(text)

    def on_end(self, *, step: int, status: str) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None

    def _eta(self) -> float:
        done = self.step - self.first_step
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self._started) / done * (self.total - self.step)

    def _line(self) -> str:
        v = self.values
        parts = [f"step {self.step}/{self.total}"]
        if "train_loss" in v:
            parts.append(f"loss {v['train_loss']:.4f}")
        if "val_loss" in v:
            parts.append(f"val {v['val_loss']:.4f}")
        if "reward" in v:  # GRPO: the mean reward says more than its loss (about 0 at a ratio of 1)
            parts.append(f"reward {v['reward']:.3f}" + (f" (val {v['val_reward']:.3f})" if "val_reward" in v else ""))
        if "lr" in v:
            parts.append(f"lr {v['lr']:.2e}")
        if "tokens_per_sec" in v:
            parts.append(f"{v['tokens_per_sec']:,.0f} tok/s")
        parts.append(f"eta {_fmt_eta(self._eta())}")
        if "peak_memory_gb" in v:
            parts.append(f"mem {v['peak_memory_gb']:.2f} GB")
        return " | ".join(parts)

    def _table(self) -> Table:
        v = self.values
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        rewards = "reward" in v  # GRPO: a reward column instead of the validation loss
        for col in ("step", "loss", "reward" if rewards else "val loss", "lr", "tok/s", "ETA", "memory"):
            table.add_column(col, justify="right")
        second = ("reward", ".3f") if rewards else ("val_loss", ".4f")
        table.add_row(
            f"{self.step}/{self.total}",
            f"{v['train_loss']:.4f}" if "train_loss" in v else "-",
            format(v[second[0]], second[1]) if second[0] in v else "-",
            f"{v['lr']:.2e}" if "lr" in v else "-",
            f"{v['tokens_per_sec']:,.0f}" if "tokens_per_sec" in v else "-",
            _fmt_eta(self._eta()),
            f"{v['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in v else "-",
        )
        return table

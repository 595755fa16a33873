"""On a CPU, torch's intra-op threads follow the cores other processes leave free (issue 23)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tunelab.backends.torch import cpu_threads
from tunelab.backends.torch.cpu_threads import CpuThreads, threads_for


def test_the_count_is_the_cores_left_at_least_one_and_at_most_torch_s_own() -> None:
    assert threads_for(2, 2, 0.0) == 2
    assert threads_for(2, 2, 0.9) == 1  # one busy neighbour on two cores
    assert threads_for(2, 2, 1.9) == 1
    assert threads_for(8, 8, 3.2) == 5
    assert threads_for(8, 4, 0.0) == 4
    assert threads_for(2, 2, -0.1) == 2  # clock noise


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_beside_busy_processes_the_step_uses_fewer_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("needs 2 or more cores")
    # torch's default, one thread per core: an earlier training step in this process (under xdist, beside the
    # other worker's load) may have lowered the count and left it so, which CpuThreads reads as the user's own.
    torch.set_num_threads(cores)
    busy: list[subprocess.Popen[bytes]] = []
    try:
        if torch.get_num_threads() != cores:
            pytest.skip("needs torch's default one thread per core")
        monkeypatch.setattr(cpu_threads, "INTERVAL_S", 1.0)
        threads = CpuThreads()
        assert threads.enabled
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
        time.sleep(1.2)
        threads.tick()
        assert torch.get_num_threads() == 1, "every core but one was busy"
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_count_an_earlier_run_left_is_not_taken_for_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before, cores = torch.get_num_threads(), os.cpu_count() or 1
    if cores < 2:
        pytest.skip("needs 2 or more cores")
    torch.set_num_threads(cores)
    try:
        first = CpuThreads()
        if not first.enabled:
            pytest.skip("/proc/stat doesn't describe this process's cores")
        first.apply(1)  # a run beside busy neighbours lowered the count and ended so
        later = CpuThreads()  # the next run in this process (a service worker's next job)
        assert later.enabled and later.most == cores and torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


def test_a_count_the_user_chose_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not CpuThreads().enabled


def test_one_or_two_threads_give_the_same_gradients_bit_for_bit() -> None:
    """Why switching mid-run keeps resumed runs exact: on this CPU a LoRA step's numbers don't depend on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", vocab_size=500, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=8, init_lora_weights=False))
    ids = torch.randint(0, 500, (8, 64))
    before, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            runs.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    finally:
        torch.set_num_threads(before)
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))

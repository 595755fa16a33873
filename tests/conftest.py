"""Shared fixtures for the whole test suite.

Isolation
    ``_isolated_home`` (autouse) points ``TUNELAB_HOME`` at a fresh temporary
    folder and unsets ``TUNELAB_DB_URL`` for every test, so nothing ever reads or
    writes ``~/.tunelab``; cached registry engines are disposed afterwards.

Tiny model
    ``tiny_model_dir`` is a real, chat-capable Hugging Face checkpoint folder
    (byte-level BPE tokenizer with a ChatML template + a 2-layer llama) built
    once per session from :data:`CORPUS`; ``tiny_tokenizer`` is its tokenizer
    loaded through :func:`tunelab.hub.load_tokenizer`.  Treat both as read-only:
    copy the folder (or load the tokenizer again) before changing anything.

CLI
    :func:`run_cli` (also the ``cli`` fixture) runs the real ``tunelab`` command
    in a subprocess.  A subprocess costs ~0.5 s (~3 s when it loads a tokenizer),
    so keep them for the paths where the process boundary matters.

Parallel runs
    ``scripts/test.sh`` runs the suite under pytest-xdist (``-n 2 --dist loadgroup``).
    :func:`pytest_collection_modifyitems` keeps on one worker the tests that share
    a fixture built once (a module- or class-scoped one: by module; a session one
    of a folder's conftest: by folder), so a trained run or a started server is
    still built once.  A test that must not run beside another of its kind gets
    ``@pytest.mark.xdist_group("name")`` itself (e.g. the MLX ring on fixed ports).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

# --------------------------------------------------------------------------- corpus

_VOCAB_TEXT = (
    "the a an cat dog bird fish sat on mat ran fast slowly big small red blue green house tree river "
    "model data train loss token learns reads writes quiet bright over under near what is answer question "
    "please tell me hello hi thanks you are helpful assistant user system tool result sum two three four "
    "yes no good morning weather today sunny rain city name"
)


def make_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Deterministic synthetic English sentences (tokenizers learn their merges from these)."""
    rng = random.Random(seed)
    vocab = _VOCAB_TEXT.split()
    out = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 12))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",\n"]))
    return out


CORPUS: list[str] = make_corpus()


# --------------------------------------------------------------------------- parallel runs

# Session fixtures of these folders' conftests are cheap (a tiny model, a data file): built once per worker,
# they need not pin every test that uses them (nearly all) to one worker.
_PER_WORKER_FOLDERS = {"", "tests", "tests/integration"}


def _shared_scope(item: pytest.Item) -> str | None:
    """The group a test joins under xdist so a fixture it shares with others is built once, or None."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    folder = module = None
    for defs in info.name2fixturedefs.values():
        for fixturedef in defs:
            # pytest imports a conftest as `conftest` (its folder is the baseid); one that another conftest
            # imports, to share its fixtures, keeps its dotted name (tests.integration.conftest).
            defined_in = getattr(fixturedef.func, "__module__", "") or ""
            if fixturedef.scope == "session" and (defined_in == "conftest" or defined_in.endswith(".conftest")):
                where = fixturedef.baseid if defined_in == "conftest" else defined_in[: -len(".conftest")]
                if where.replace(".", "/") not in _PER_WORKER_FOLDERS:
                    folder = where.replace(".", "/")
            elif fixturedef.scope in ("package", "module", "class"):
                module = item.nodeid.split("::", 1)[0]
    return folder or module


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup``: tests sharing a built-once fixture run on one worker (see the module doc)."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None and (group := _shared_scope(item)) is not None:
            item.add_marker(pytest.mark.xdist_group(group))


# --------------------------------------------------------------------------- isolation


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ``TUNELAB_HOME`` per test and no ``TUNELAB_DB_URL``; registries closed afterwards."""
    home = tmp_path_factory.mktemp("tunelab_home")
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    monkeypatch.delenv("TUNELAB_DB_URL", raising=False)
    yield home
    try:
        from tunelab.registry import db
    except ImportError:  # pragma: no cover - registry not importable
        return
    close = getattr(db, "close_registries", None)
    if close is not None:
        close()


@pytest.fixture(autouse=True)
def _main_module_kept() -> Iterator[None]:
    """Put back ``sys.modules["__main__"]`` after a test that swapped it (Streamlit's AppTest does).

    Streamlit's script runner installs the page script as ``__main__`` and never puts the old one back.  Every
    spawn or forkserver child this process starts afterwards then re-runs that temporary script as its own
    main module (``multiprocessing.spawn._fixup_main_from_path``), dies of a ``NameError``, and a later
    ``ProcessPoolExecutor`` (``data.num_proc``) raises ``BrokenProcessPool``: a dashboard test that ran
    earlier in the same process (under xdist: on the same worker) broke the parallel tokenization tests.
    """
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture
def tunelab_home(_isolated_home: Path) -> Path:
    """The ``TUNELAB_HOME`` folder of the current test."""
    return _isolated_home


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """The sentences the session tokenizers were trained on (build other tokenizers from it too)."""
    return list(CORPUS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local llama checkpoint with a byte-level BPE tokenizer and a ChatML chat template."""
    from tunelab.tiny import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny_model") / "llama-bpe"
    return make_tiny_checkpoint(
        out,
        CORPUS,
        arch="llama",
        tokenizer="bpe",
        vocab_size=400,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    """The tokenizer of :func:`tiny_model_dir`, loaded the way training loads it (read-only!)."""
    from tunelab.hub import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def tokenizer_only_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_model_dir`` without its weights: any attempt to load the model fails.

    Point ``model.path`` here to prove that a command refuses bad input *before*
    it loads the model.
    """
    out = tmp_path_factory.mktemp("tokenizer_only") / "no-weights"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return out


# --------------------------------------------------------------------------- CLI


def _cli_command() -> list[str]:
    """``python -m tunelab`` when the package supports it, else the installed console script."""
    if importlib.util.find_spec("tunelab.__main__") is not None:
        return [sys.executable, "-m", "tunelab"]
    script = shutil.which("tunelab")
    if script is None:  # pragma: no cover - the package is installed with its entry point
        pytest.fail("neither `python -m tunelab` nor a `tunelab` script is available")
    return [script]


def cli_env(home: str | os.PathLike[str], **extra: str) -> dict[str, str]:
    """This process's environment for a CLI child whose registry and runs live under ``home`` (SQLite there)."""
    env = {**os.environ, "TUNELAB_HOME": str(home), **extra}
    env.pop("TUNELAB_DB_URL", None)
    return env


# The CLI in-process behind a hook that reports the process's peak address space (VmPeak) on stderr at exit.
_CLI_REPORTING_PEAK = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmPeak')))\n"
    "atexit.register(_peak)\n"
    "sys.argv[0] = 'tunelab'\n"
    "from tunelab.cli.main import main\n"
    "main()\n"
)


def run_cli_capped(
    *args: str | os.PathLike[str], home: str | os.PathLike[str], limit: int | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """The real CLI under an address-space limit (``RLIMIT_AS``, none when ``limit`` is None), Linux only.

    A real out-of-memory, not a simulated one: what the limit is set against is the peak an unlimited run
    reports (:func:`address_space_peak` of its stderr).  One thread and two malloc arenas keep that peak
    steady from run to run.
    """
    import resource

    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = cli_env(home, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2", **extra)
    return subprocess.run([sys.executable, "-c", _CLI_REPORTING_PEAK, *(str(a) for a in args)], env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=cap)  # fmt: skip


def address_space_peak(stderr: str) -> int:
    """Bytes of the peak address space that a :func:`run_cli_capped` child reported."""
    line = next(line for line in stderr.splitlines() if line.startswith("VmPeak"))
    return int(line.split()[1]) * 1024


def start_cli(
    *args: str | os.PathLike[str], home: str | os.PathLike[str], launcher: Sequence[str] = (), **extra: str
) -> subprocess.Popen[str]:
    """Start the real CLI (``launcher`` first, e.g. torchrun's) with text pipes; the caller waits on it."""
    return subprocess.Popen(
        [sys.executable, *launcher, "-m", "tunelab", *(str(a) for a in args)],
        env=cli_env(home, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(
    *args: str | os.PathLike[str],
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    home: str | os.PathLike[str] | None = None,
    command: Sequence[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``tunelab`` CLI in a subprocess and capture its text output.

    The child inherits this process's environment (including the per-test
    ``TUNELAB_HOME``, or ``home`` when given) plus ``env``.  ``command`` replaces
    the CLI's own launch (``python -c`` with code of the test's before ``main()``).
    Never raises on a non-zero exit code: check ``returncode``, ``stdout`` and ``stderr`` yourself.
    """
    child_env = {**(cli_env(home) if home is not None else os.environ), **(env or {})}
    if not child_env.get("TUNELAB_HOME"):
        # Called outside a test (e.g. from a module fixture): still never touch ~/.tunelab.
        child_env["TUNELAB_HOME"] = tempfile.mkdtemp(prefix="tunelab_home_")
    return subprocess.run(
        [*(command or _cli_command()), *(str(a) for a in args)],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`run_cli` as a fixture: ``cli("data", "validate", path)``."""
    return run_cli

"""What the CLI's process pays for besides the work asked of it: imports it never uses, and the exit.

A small model's `tunelab train` is seconds long, so a module imported for nothing or the interpreter's
teardown (about a second with torch, transformers and PEFT loaded) is a visible share of it
(``bench/small_steps_cpu.py``, issue 23).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tunelab.data.arrow_split import SplitWriter, TokenizedChunk, read_split
from tunelab.vocab import IGNORE


def _python(code: str, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if home is not None:
        import os

        env = {**os.environ, "TUNELAB_HOME": str(home)}
        env.pop("TUNELAB_DB_URL", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_cli_imports_no_migration_tooling_until_a_registry_is_opened() -> None:
    """alembic (with mako and its dialect modules) loads with the first registry, not with the CLI."""
    out = _python("import sys, tunelab.cli.main; print(sorted(m for m in ('alembic', 'mako') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_tokenized_split_round_trips_without_pandas(tmp_path: Path) -> None:
    """pyarrow's ``pa.array``/``to_numpy`` import pandas (~0.4 s); the split file is written and read without them."""
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from tunelab.data.arrow_split import SplitWriter, TokenizedChunk, read_split\n"
        "w = SplitWriter(Path(sys.argv[1]))\n"
        "w.write(TokenizedChunk(np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32), "
        "np.array([2, 3]), 0, 0, np.array([1, 0], dtype=np.int8)))\n"
        "w.close()\n"
        "s = read_split(Path(sys.argv[1]), truncated=0, dropped=0, supervised=3)\n"
        "print([r.tolist() for r in s.input_ids], s.roles.tolist(), 'pandas' in sys.modules)\n"
    )
    out = _python(code, str(tmp_path / "split.arrow"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[0, 1], [2, 3, 4]] [1, 0] False"


def test_a_split_reads_back_as_written(tmp_path: Path) -> None:
    """Rows, labels and roles over several record batches, and an empty chunk in between."""
    path = tmp_path / "split.arrow"
    writer = SplitWriter(path)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 1000, size=n).astype(np.int32) for n in (3, 1, 7, 2)]
    labels = [np.where(r % 2 == 0, r, IGNORE).astype(np.int32) for r in rows]
    for part in (slice(0, 2), slice(2, 2), slice(2, 4)):
        ids, labs = rows[part], labels[part]
        writer.write(
            TokenizedChunk(
                ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
                labels=np.concatenate(labs) if labs else np.zeros(0, np.int32),
                lengths=np.array([len(r) for r in ids], dtype=np.int64),
                truncated=1,
                dropped=0,
                roles=np.array([i % 2 for i in range(len(ids))], dtype=np.int8),
            )
        )
    meta = writer.close()
    split = read_split(path, truncated=meta["truncated"], dropped=meta["dropped"], supervised=meta["supervised_tokens"])
    assert [r.tolist() for r in split.input_ids] == [r.tolist() for r in rows]
    assert [r.tolist() for r in split.labels] == [r.tolist() for r in labels]
    assert split.roles is not None and split.roles.tolist() == [0, 1, 0, 1]
    assert meta["rows"] == 4 and meta["truncated"] == 3


def test_the_command_line_exits_with_its_code_after_the_atexit_hooks(tmp_path: Path) -> None:
    """The process ends without the interpreter's teardown, but as Python would: atexit hooks run, output
    is flushed, the exit code is the command's (0, a user error's, a usage error's)."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('hook ran', file=sys.stderr))\n"
        "sys.argv[0] = 'tunelab'\n"
        "from tunelab.cli.main import main\n"
        "main()\n"
        "print('never here')\n"
    )
    ok = _python(code, "--version", home=tmp_path)
    assert (ok.returncode, ok.stdout.strip(), ok.stderr.strip()) == (0, ok.stdout.strip(), "hook ran")
    assert ok.stdout.strip() and "never here" not in ok.stdout
    missing = _python(code, "runs", "show", "nosuch", home=tmp_path)
    assert missing.returncode == 6 and "no run with id nosuch" in missing.stderr and "hook ran" in missing.stderr
    usage = _python(code, "no-such-command", home=tmp_path)
    assert usage.returncode == 2 and "hook ran" in usage.stderr


def test_in_process_callers_get_system_exit_back() -> None:
    """``main(argv)`` (tests, embedding programs) raises SystemExit as before instead of ending the process."""
    from tunelab.cli.main import main

    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code in (0, None)
    else:
        raise AssertionError("main() returned without SystemExit")

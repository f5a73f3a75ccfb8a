"""Shared test set-up: no network, a private cache, and tiny models registered through the API."""

from __future__ import annotations

import os
import tempfile

# Before anything imports huggingface_hub / transformers / datasets: never touch the network.
for _switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_switch] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["LOWMEM_LOAD_PLUGINS"] = ""  # installed third-party plugins stay out of the tests
os.environ.setdefault("LOWMEM_CACHE_DIR", tempfile.mkdtemp(prefix="lowmem-test-cache-"))
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="lowmem-test-hf-"))

import pytest  # noqa: E402
import tiny_plugin  # noqa: E402 - the tiny models, registered as a plugin module


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Width-32 models run several times faster on one thread than on two busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_registry():
    """A fresh registry: built-ins plus the tiny test models, no entry points."""
    from lowmem.registry import load_registry

    return load_registry("", extra=[tiny_plugin])


@pytest.fixture(scope="module")
def registry():
    """One registry (built-ins plus tiny models) shared by a test module."""
    from lowmem.registry import load_registry

    return load_registry("", extra=[tiny_plugin])


@pytest.fixture(scope="module")
def tokenizer(registry):
    """The fallback BPE at the tiny models' vocabulary, from the tests' private cache."""
    from pathlib import Path

    from lowmem.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer=None, model_path=None, model_plugin=registry.model("tiny-roberta"),
                          cache_dir=Path(os.environ["LOWMEM_CACHE_DIR"]), registry=registry,
                          say=lambda message: None)


@pytest.fixture
def plugins(monkeypatch):
    """Set the plugins the process registry loads besides the built-ins (the tiny models by
    default): ``plugins(extra_plugin, ...)`` adds inline hookimpl objects for one test."""
    from lowmem import registry

    def use(*extra: object) -> None:
        monkeypatch.setattr(registry, "EXTRA_PLUGINS", [tiny_plugin, *extra])
        registry.reset_registry()

    use()
    yield use
    registry.reset_registry()


@pytest.fixture
def cli(plugins, monkeypatch):
    """A CliRunner-driven ``lowmem`` with the tiny models registered; returns invoke(args)."""
    from typer.testing import CliRunner

    from lowmem import cli as cli_module

    monkeypatch.setenv("COLUMNS", "200")  # rich tables unwrapped, so names are asserted whole
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli_module.app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def launch_env(tmp_path_factory):
    """The environment of a torchrun-launched worker: tiny models via an entry point, offline.

    Torchrun workers are fresh interpreters that cannot see the tiny models registered here in
    process, so they load tests/tiny_plugin.py through a fake installed distribution."""
    from pathlib import Path

    site = tmp_path_factory.mktemp("site")
    info = site / "lowmem_tiny_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lowmem-tiny-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lowmem]\ntiny = tiny_plugin\n")
    path = [str(site), str(Path(__file__).resolve().parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **os.environ, "PYTHONPATH": os.pathsep.join(path), "LOWMEM_LOAD_PLUGINS": "tiny",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        # Shared with the in-process runs: the same cached tokenizer on both sides.
        "LOWMEM_CACHE_DIR": os.environ["LOWMEM_CACHE_DIR"],
        # One thread per worker, as the in-process runs use: CPU SVD is bitwise repeatable
        # only at a fixed thread count.
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="session")
def sharded_runs(launch_env, tmp_path_factory):
    """``lowmem train --nproc 2 --parallel fsdp`` per optimizer, run once per test session;
    returns the folder holding its run (``run``) and settings files."""
    from pathlib import Path

    from support_fsdp import fsdp_args
    from support_runs import launch

    runs: dict[str, Path] = {}

    def get(optimizer: str) -> Path:
        if optimizer not in runs:
            folder = tmp_path_factory.mktemp(f"fsdp-{optimizer.replace('+', '-')}")
            result = launch(launch_env, *fsdp_args(folder, optimizer, "run", ["--parallel", "fsdp"]),
                            "--nproc", "2")
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.count("lowmem run:") == 1 and "error" not in result.stderr
            runs[optimizer] = folder
        return runs[optimizer]

    return get

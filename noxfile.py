"""nox sessions: tests (default), lint, typecheck, bench (each installs the CPU torch first), and gpu
(the prepared GPU check: it keeps the CUDA torch the machine has)."""

import nox

nox.options.sessions = ["tests"]
CPU_TORCH = "torch==2.13.0"


@nox.session
def tests(session):
    session.install(CPU_TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "core", "plugins", "tests", "noxfile.py")


@nox.session
def typecheck(session):
    # mypy cannot see through the editable install's import hook: check a normal install.
    session.install(CPU_TORCH)
    session.install(".", "mypy")
    session.run("mypy", "-p", "lowmem")


@nox.session
def bench(session):
    session.install(CPU_TORCH)
    session.install("-e", ".[test]")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session):
    """On a GPU machine, in the environment that has lowmem and a CUDA torch installed: the CUDA
    tests, peak memory against the estimator, throughput against Trainer (bench/gpu-results.md)."""
    session.run("python", "bench/gpu_check.py", *session.posargs)

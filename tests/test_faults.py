"""Faults injected for real: NaN losses, fp16 overflow, corrupt and malicious checkpoints, a full
disk, remote code, a plugin that breaks mid-run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support_runs import pretrain_args, read_metrics
from tiny_plugin import tiny_model_classes

import lowmem


def poisoned_llama(name: str, at_call: int, factor: float, gradient_only: bool = False):
    """A tiny llama whose loss (or, ``gradient_only``, the gradient flowing back from its finite
    loss) is multiplied by ``factor`` on its ``at_call``-th training forward."""
    base = tiny_model_classes()[0]

    class Poisoned(base):
        def build(self, request):
            model = super().build(request)
            original, calls = model.forward, [0]

            def forward(*args, **kwargs):
                output = original(*args, **kwargs)
                if model.training:
                    calls[0] += 1
                    if calls[0] == at_call:
                        scale = ScaleGradient.apply if gradient_only else lambda x, f: x * f
                        output.loss = scale(output.loss, factor)
                return output

            model.forward = forward
            return model

    Poisoned.name = name
    return Poisoned()


def _scale_gradient():
    import torch

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, factor):
            ctx.factor = factor
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * ctx.factor, None

    return Scale


ScaleGradient = _scale_gradient()


class Faulty:
    @lowmem.hookimpl
    def register_models(self, register):
        register(poisoned_llama("nan-at-5", 5, float("nan")))
        register(poisoned_llama("overflow-at-3", 3, 1e9))
        register(poisoned_llama("inf-gradient-at-3", 3, float("inf"), gradient_only=True))

    @lowmem.hookimpl
    def register_datasets(self, register):
        register(BreaksMidRun())


class BreaksMidRun(lowmem.Dataset):
    name = "breaks-mid-run"
    description = "yields some documents, then raises"

    def records(self, request):
        for i in range(30 if request.split == "train" else 4):
            yield {"text": f"document number {i} " * 20}
        if request.split == "train":
            raise OSError("the network share went away")


@pytest.fixture
def faulty_cli(cli, plugins):
    plugins(Faulty())
    return cli


def with_model(args: list[str], model: str) -> list[str]:
    args = list(args)
    args[args.index("--model") + 1] = model
    return args


def all_finite(checkpoint: Path) -> bool:
    import safetensors.torch
    import torch

    from lowmem.checkpoint_files import load_tensors
    from lowmem.memory import iter_tensors

    tensors = [*safetensors.torch.load_file(str(checkpoint / "model.safetensors")).values(),
               *iter_tensors(load_tensors(checkpoint / "optimizer.pt"))]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors if t.is_floating_point())


def test_nan_loss_stops_before_the_update(faulty_cli, tmp_path):
    from lowmem.checkpoint_files import complete_checkpoints, verify

    args = with_model(pretrain_args(tmp_path, "galore", tokens=3000, extra=["--save-every", "2"]), "nan-at-5")
    result = faulty_cli(*args)
    assert result.exit_code == 3, result.output
    assert "non-finite loss at step 5" in result.output and "Traceback" not in result.output
    saved = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["step-2", "step-4"]
    for checkpoint in saved:
        verify(checkpoint)
        assert all_finite(checkpoint)


def test_nan_loss_skip_keeps_parameters_and_schedule(faulty_cli, tmp_path):
    args = with_model(pretrain_args(tmp_path, "baseline", tokens=1500, extra=["--on-nonfinite", "skip"]),
                      "nan-at-5")
    result = faulty_cli(*args)
    assert result.exit_code == 0, result.output
    assert "non-finite loss at step 5; update skipped" in result.output
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # the skipped batch is not a step
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["scheduler"]["last_epoch"] == state["state"]["step"]


def test_per_layer_updates_stop_at_a_non_finite_gradient(faulty_cli, tmp_path):
    """Per-layer GaLore steps each weight inside backward: an inf gradient (of a finite loss)
    must reach no weight, the step must count as skipped, and stop mode must exit 3."""
    from lowmem.checkpoint_files import complete_checkpoints

    args = with_model(pretrain_args(tmp_path, "galore", tokens=1500,
                                    extra=["--per-layer", "--on-nonfinite", "skip"]), "inf-gradient-at-3")
    result = faulty_cli(*args)
    assert result.exit_code == 0, result.output
    assert "non-finite gradient norm at step 3; the rest of the update skipped" in result.output
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows and all(math.isfinite(r["grad_norm"]) for r in rows)  # a real norm, never NaN
    assert all(all_finite(c) for c in complete_checkpoints(tmp_path / "run"))

    stop = with_model(pretrain_args(tmp_path, "galore", out="stop", tokens=1500,
                                    extra=["--per-layer", "--save-every", "2"]), "inf-gradient-at-3")
    result = faulty_cli(*stop)
    assert result.exit_code == 3 and "non-finite gradient norm at step 3" in result.output
    assert "Traceback" not in result.output
    saved = complete_checkpoints(tmp_path / "stop")
    assert [p.name for p in saved] == ["step-2"] and all_finite(saved[0])


@pytest.mark.parametrize("optimizer", ["lomo", "adalomo"])
def test_lomo_logs_the_gradient_norm_and_holds_back_a_non_finite_gradient(faulty_cli, tmp_path, optimizer):
    """LOMO updates inside backward too: it logs the norm of the gradients it updated from (the
    one a normal step logs), and an inf gradient reaches no weight."""
    from lowmem.checkpoint_files import complete_checkpoints

    first = pretrain_args(tmp_path, optimizer, out="plain", tokens=256)
    assert faulty_cli(*first).exit_code == 0
    reference = pretrain_args(tmp_path, "baseline", out="reference", tokens=256)
    assert faulty_cli(*reference).exit_code == 0
    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / run) if "loss" in r]
             for run in ("plain", "reference")]
    assert norms[0][0] == pytest.approx(norms[1][0], rel=1e-5)  # the same first gradients
    assert all(n is not None and math.isfinite(n) for n in norms[0])

    args = with_model(pretrain_args(tmp_path, optimizer, tokens=1500, extra=["--on-nonfinite", "skip"]),
                      "inf-gradient-at-3")
    result = faulty_cli(*args)
    assert result.exit_code == 0, result.output
    assert "non-finite gradient norm at step 3; the rest of the update skipped" in result.output
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows and all(math.isfinite(r["grad_norm"]) for r in rows)
    saved = complete_checkpoints(tmp_path / "run")
    assert saved and all(all_finite(checkpoint) for checkpoint in saved)


def test_fp16_overflow_is_skipped_by_the_scaler_without_advancing_the_schedule(faulty_cli, tmp_path):
    args = with_model(pretrain_args(tmp_path, "baseline", tokens=1500), "overflow-at-3")
    args[args.index("--dtype") + 1] = "fp16"
    result = faulty_cli(*args)
    assert result.exit_code == 0, result.output
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["scaler"]["scale"] < 2.0**16  # the scaler saw inf gradients and backed off
    assert state["scheduler"]["last_epoch"] == state["state"]["step"] - 1


def _two_checkpoints(cli, tmp_path) -> tuple[list[str], list[Path]]:
    from lowmem.checkpoint_files import complete_checkpoints

    args = pretrain_args(tmp_path, "galore8bit", tokens=1600,
                         extra=["--save-every", "3", "--keep-checkpoints", "5"])
    assert cli(*args).exit_code == 0
    return args, complete_checkpoints(tmp_path / "run")


def test_corrupt_checkpoint_is_named_and_latest_falls_back(cli, tmp_path):
    args, saved = _two_checkpoints(cli, tmp_path)
    newest = saved[-1]
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))

    direct = cli(*args, "--resume", str(newest))
    assert direct.exit_code == 2
    assert str(newest / "optimizer.pt") in direct.output and "checksum" in direct.output

    latest = cli(*args, "--resume", "latest")
    assert latest.exit_code == 0, latest.output
    assert str(newest / "optimizer.pt") in latest.output and f"resumed from {saved[-2]}" in latest.output


def test_truncated_checkpoint_file_is_detected(cli, tmp_path):
    args, saved = _two_checkpoints(cli, tmp_path)
    weights = saved[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = cli(*args, "--resume", str(saved[-1]))
    assert result.exit_code == 2 and str(weights) in result.output


class Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(cli, tmp_path):
    import hashlib

    import torch

    args, saved = _two_checkpoints(cli, tmp_path)
    newest, marker = saved[-1], tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, newest / "optimizer.pt")
    # The attacker also fixes the manifest, so only the loader stands in the way.
    manifest = json.loads((newest / "manifest.json").read_text())
    content = (newest / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    result = cli(*args, "--resume", str(newest))
    assert result.exit_code == 2 and "not plain tensors" in result.output
    assert not marker.exists()


def test_full_disk_during_a_save_names_the_path_and_keeps_the_previous(cli, tmp_path, monkeypatch):
    from fault_injection import inject

    from lowmem.checkpoint_files import complete_checkpoints, verify

    inject("disk-full:files@6", monkeypatch.setattr)
    args = pretrain_args(tmp_path, "baseline", tokens=3000, extra=["--save-every", "3"])
    result = cli(*args)
    assert result.exit_code == 2
    assert "No space left on device" in result.output
    assert str(tmp_path / "run" / "checkpoints") in result.output
    saved = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["step-3"] and verify(saved[0])
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_remote_code_model_folder_is_refused(cli, tmp_path):
    folder = tmp_path / "sneaky"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_sneaky.SneakyForCausalLM"}}))
    (folder / "modeling_sneaky.py").write_text("raise SystemExit('remote code ran')\n")
    result = cli("train", "--mode", "finetuning", "--optimizer", "baseline", "--model", "tiny-llama",
                 "--dataset", "stdlib-docs", "--model-path", str(folder), "--max_length", "32",
                 "--output-dir", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--trust-remote-code" in result.output


def test_plugin_failing_mid_run_is_named(faulty_cli, tmp_path):
    from lowmem.checkpoint_files import complete_checkpoints, verify

    args = pretrain_args(tmp_path, "baseline", tokens=10**6,
                         extra=["--dataset", "breaks-mid-run", "--save-every", "1"])
    result = faulty_cli(*args)
    assert result.exit_code == 1, result.output
    assert "dataset 'breaks-mid-run'" in result.output and "records()" in result.output
    assert "the network share went away" in result.output and "Traceback" not in result.output
    assert all(verify(p) for p in complete_checkpoints(tmp_path / "run"))


class EmptyTrainSplit(lowmem.Dataset):
    name = "empty-train"
    description = "nothing to train on"

    def records(self, request):
        if request.split == "eval":
            yield {"text": "held out " * 40}


def test_data_too_small_for_one_step_is_an_error_not_an_endless_loop(cli, plugins, tmp_path):
    class Plugin:
        @lowmem.hookimpl
        def register_datasets(self, register):
            register(EmptyTrainSplit())

    plugins(Plugin())
    result = cli(*pretrain_args(tmp_path, "baseline", extra=["--dataset", "empty-train"]))
    assert result.exit_code == 2 and "too small" in result.output


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(cli, tmp_path):
    from lowmem.checkpoint_files import complete_checkpoints

    args, saved = _two_checkpoints(cli, tmp_path)
    assert [p.name for p in saved] == ["step-3", "step-6", "step-9", "step-12", "step-13"]
    result = cli(*args, "--resume", str(saved[0]), "--keep-checkpoints", "1")
    assert result.exit_code == 0, result.output
    assert "abandoned" in result.output
    # The resumed run's own final checkpoint survives rotation; the abandoned ones are kept aside.
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-13"]
    assert {p.name for p in (tmp_path / "run" / "checkpoints").glob("abandoned-*")} == {
        "abandoned-step-6", "abandoned-step-9", "abandoned-step-12", "abandoned-step-13"}


def test_changed_learning_rate_on_resume_is_refused(cli, tmp_path):
    args, _ = _two_checkpoints(cli, tmp_path)
    changed = list(args)
    changed[changed.index("--lr") + 1] = "5e-2"
    result = cli(*changed, "--resume", "latest")
    assert result.exit_code == 2 and "lr" in result.output

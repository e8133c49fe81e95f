"""One model spec for both CLIs (samplers/models.py): a bad diffusers folder is the same one `error:` line, exit 2,
from `python -m samplers generate` and `python -m optimize`, found before the net is allocated; sample-size limits;
user code (a callable target) failing or exiting at the model boundary; the watchdog on denoiser calls."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from optimize.cli import ConfigError
from optimize.cli import main as optimize_main
from samplers.__main__ import main as samplers_main
from samplers.models import MAX_SAMPLE_ELEMENTS, WatchedDenoiser, check_sample_shape, check_timeout

diffusers = pytest.importorskip("diffusers")
from tiny_models import save_tiny  # noqa: E402 - the one tiny diffusers folder of the tests

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
TARGET = str(Path(__file__).with_name("hostile_targets.py"))  # user code that misbehaves (shared with scripts/probe_inputs.py)


def _save(folder: Path, width: tuple[int, int] = (8, 16), classes: int | None = None) -> Path:
    return save_tiny(folder, classes=classes, width=width)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("wide"), width=(16, 32))


@pytest.fixture(scope="module")
def cond(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("cond"), classes=3)


def _edit(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _broken(tmp_path: Path, tiny: Path, wide: Path, what: str) -> Path:
    """A copy of the tiny folder with one thing wrong."""
    folder = tmp_path / what
    shutil.copytree(tiny, folder)
    unet, sched = folder / "unet" / "config.json", folder / "scheduler" / "scheduler_config.json"
    if what == "beta_schedule":
        _edit(sched, beta_schedule="bogus")
    elif what == "timesteps":
        _edit(sched, num_train_timesteps=0)
    elif what == "fourier":
        _edit(unet, time_embedding_type="fourier")
    elif what == "sample_size0":
        _edit(unet, sample_size=0)
    elif what == "sample_size_huge":
        _edit(unet, sample_size=60000)
    elif what == "width":
        shutil.copy(wide / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet")
    elif what == "huge_net":
        _edit(unet, block_out_channels=[100000, 200000])
    elif what == "missing_tensor":  # weights without the class embedding the config asks for
        _edit(unet, num_class_embeds=3)
    elif what == "truncated":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _generate_fails(argv: list[str], tmp_path: Path, capsys) -> str:
    code = samplers_main(["generate", "--no-progress", "--solver", "euler", "--nfe", "4", "--n", "2",
                          "--out", str(tmp_path / "out"), *argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and not (tmp_path / "out").exists()
    return _one_error_line(captured.err)


def _optimize_fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        optimize_main(argv)
    assert exc.value.code == 2
    return _one_error_line(capsys.readouterr().err)


# --- one diffusers check for both CLIs -------------------------------------------------------------
@pytest.mark.parametrize("what, needle", [
    ("beta_schedule", "beta_schedule 'bogus' is not supported"),
    ("timesteps", "num_train_timesteps must be an integer in [2, 100000], got 0"),
    ("fourier", "a score-SDE (Fourier time) UNet is not a discrete-time VP model"),
    ("sample_size0", "sample_size must be a positive integer or [height, width], got 0"),
    ("sample_size_huge", f"sample shape [1, 60000, 60000] has 3,600,000,000 numbers per sample, more than the limit of "
                         f"{MAX_SAMPLE_ELEMENTS:,}"),
    ("width", "tensor conv_in.weight is [16, 1, 3, 3] in the file but [8, 1, 3, 3] in the net the config describes "
              "(weights of another width)"),
    ("huge_net", "tensor conv_in.weight is [8, 1, 3, 3] in the file but [100000, 1, 3, 3]"),
    ("missing_tensor", "lacks 1 tensor(s) of the net"),
    ("truncated", "is not a readable safetensors file"),
])
def test_bad_diffusers_folder_is_one_line_from_both_clis(tmp_path, tiny, wide, capsys, what, needle):
    folder = _broken(tmp_path, tiny, wide, what)
    line = _generate_fails(["--model", f"diffusers:{folder}"], tmp_path, capsys)
    assert line.startswith(f"error: --model diffusers:{folder}: ") and needle in line, line
    line = _optimize_fails(["iia", "model=diffusers", f"model.path={folder}", "nfe=4"], capsys)
    assert line.startswith(f"error: model.path={folder}: ") and needle in line, line


def test_missing_tensor_under_another_name_is_found_at_load(tmp_path, tiny, capsys):
    """Same numbers, one tensor renamed: diffusers would start it from random weights; refused at load."""
    from safetensors.torch import load_file, save_file

    from samplers.models import load_diffusers
    from samplers.models import check_diffusers_weights

    folder = tmp_path / "renamed"
    shutil.copytree(tiny, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["old.query.weight"] = sd.pop("conv_out.bias")  # a legacy attention name: the pre-check leaves it to the load
    save_file(sd, weights)
    check_diffusers_weights(folder / "unet", json.loads((folder / "unet" / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"lack 1 tensor\(s\) of the net its config.json describes \(e.g. conv_out.bias\)"):
        load_diffusers(folder)
    assert "lack 1 tensor(s)" in _generate_fails(["--model", f"diffusers:{folder}"], tmp_path, capsys)


def test_class_conditioning_checked_by_both_clis(tmp_path, tiny, cond, capsys):
    assert _generate_fails(["--model", f"diffusers:{cond}"], tmp_path, capsys) == \
        (f"error: --model diffusers:{cond}: this net is class-conditional (3 class embeddings): add --label K or "
         f"--label-weights P0,P1,... (one of them).")
    assert "--label must be an integer in [0, 3), got 3." in _generate_fails(["--model", f"diffusers:{cond}", "--label", "3"], tmp_path, capsys)
    assert f"--model diffusers:{tiny}: --label is set, but this net is not class-conditional." in \
        _generate_fails(["--model", f"diffusers:{tiny}", "--label", "1"], tmp_path, capsys)
    assert "set exactly one of model.label=K" in _optimize_fails(["iia", "model=diffusers", f"model.path={cond}", "nfe=4"], capsys)
    code = samplers_main(["generate", "--no-progress", "--solver", "euler", "--nfe", "2", "--n", "2", "--model",
                          f"diffusers:{cond}", "--label", "1", "--out", str(tmp_path / "ok")])
    assert code == 0 and (tmp_path / "ok" / "samples.npz").is_file()


def test_fingerprints_are_the_same_in_both_clis(tiny):
    """generate and optimize fingerprint an unlabelled diffusers model alike, and the shipped folder's value is pinned
    (tables shipped for it depend on it)."""
    from optimize.data.models import load_model
    from samplers.models import load

    base = OmegaConf.load(REPO / "conf" / "model" / "diffusers.yaml")
    for folder, pinned in ((tiny, None), (REPO / "checkpoints" / "diffusers-digits", "7ec115a5fb1bab8d")):
        loaded = load(f"diffusers:{folder}")
        m = load_model(OmegaConf.merge(base, {"path": str(folder)}))
        assert loaded.fingerprint == m.fingerprint == m.denoiser.fingerprint() and loaded.shape == m.shape == (1, 8, 8)
        assert pinned is None or loaded.fingerprint == pinned


# --- size limits -----------------------------------------------------------------------------------
def test_sample_shape_limit():
    assert check_sample_shape([1, 8, 8]) == (1, 8, 8) and check_sample_shape((MAX_SAMPLE_ELEMENTS,)) == (MAX_SAMPLE_ELEMENTS,)
    with pytest.raises(ValueError, match=r"sample shape \[1, 100000, 100000\] has 10,000,000,000 numbers per sample, more "
                                         r"than the limit of 67,108,864 \(2\^26"):
        check_sample_shape((1, 100000, 100000))
    for bad in ((1, -8), (), (1.5, 2), (True, 4), "abc", None):
        with pytest.raises(ValueError, match="must be a non-empty sequence of positive integers"):
            check_sample_shape(bad)


def test_gmm_shape_limit_before_allocation():
    from optimize.data.models import load_model

    with pytest.raises(ConfigError, match=r"model.shape: sample shape \[1, 100000, 100000\] has"):
        load_model(OmegaConf.merge(OmegaConf.load(REPO / "conf" / "model" / "gmm.yaml"), {"shape": [1, 100000, 100000]}))


# --- user code at the model boundary ---------------------------------------------------------------
@pytest.mark.parametrize("target, needle", [
    ("huge_shape", "sample shape [1, 100000, 100000] has 10,000,000,000 numbers per sample, more than the limit"),
    ("exits", "raised SystemExit (sys.exit(0))"),
    ("interrupts", "raised KeyboardInterrupt"),
    ("bad_fingerprint", "the denoiser's fingerprint() raised RuntimeError: no hash today"),
    ("denoiser_exits", "the denoiser failed on a test batch of shape (2, 1, 4, 4) (SystemExit (sys.exit(3)))"),
    ("denoiser_interrupts", "the denoiser failed on a test batch of shape (2, 1, 4, 4) (KeyboardInterrupt)"),
])
def test_user_code_failing_or_exiting_is_one_line(capsys, target, needle):
    line = _optimize_fails(["iia", "model=callable", f"model.target={TARGET}:{target}", "nfe=4"], capsys)
    assert line.startswith(f"error: model.target={TARGET}:{target}") and needle in line, line


def test_module_that_exits_on_import(tmp_path, capsys):
    module = tmp_path / "exits_on_import.py"
    module.write_text("import sys\nsys.exit(0)\n")
    line = _optimize_fails(["iia", "model=callable", f"model.target={module}:make", "nfe=4"], capsys)
    assert f"cannot import {module} (SystemExit (sys.exit(0)))" in line


def test_timeout_stops_a_sleeping_target_in_the_precheck(capsys):
    start = time.monotonic()
    line = _optimize_fails(["iia", "model=callable", f"model.target={TARGET}:sleeper", "model.timeout_s=0.5", "nfe=4"], capsys)
    assert time.monotonic() - start < 20
    assert line == (f"error: model.timeout_s=0.5: a call of the denoiser of model.target={TARGET}:sleeper took longer than "
                    f"0.5 s at sigma 2 (batch of 2); raise model.timeout_s or make the model faster.")


@pytest.mark.parametrize("value", ["-1", "0", "abc", "inf", "true"])
def test_bad_timeout_values(capsys, value):
    line = _optimize_fails(["iia", "model=callable", f"model.target={TARGET}:sleeper", f"model.timeout_s={value}", "nfe=4"], capsys)
    assert "model.timeout_s must be a positive number of seconds or null (no limit)" in line


# --- the watchdog ----------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    sigma_max = 80.0

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.delay, self.shape = delay, (1, 2)

    def forward(self, x, sigma, cond=None):
        try:
            time.sleep(self.delay)
        except Exception:  # user code that swallows every Exception must still be stopped
            pass
        return self.w * x

    def fingerprint(self):
        return "abc"


def test_watched_denoiser_forwards_and_notes_the_first_call(capsys):
    net = _Net()
    w = WatchedDenoiser(net)
    x = torch.ones(3, 1, 2)
    assert torch.equal(w(x, torch.ones(3)), x) and torch.equal(w(x, torch.ones(3), None), x)
    assert capsys.readouterr().err.count("note: first model call took ") == 1
    assert w.fingerprint() == "abc" and w.shape == (1, 2) and w.sigma_max == 80.0 and w.delay == 0.0
    assert isinstance(w, torch.nn.Module) and w.to(torch.float64).denoiser.w.dtype == torch.float64
    assert WatchedDenoiser(lambda x, s: x + 1, report=False)(x, 1.0).sum() == 12 and capsys.readouterr().err == ""


def test_watchdog_interrupts_python_code():
    w = WatchedDenoiser(_Net(delay=30), 0.2, error=ConfigError)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^model.timeout_s=0.2: a call of the denoiser took longer than 0.2 s at sigma 3 "
                                          r"\(batch of 2\)"):
        w(torch.ones(2, 1, 2), torch.tensor([3.0, 1.0]))
    assert time.monotonic() - start < 5
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL


def test_watchdog_outside_the_main_thread_checks_after_the_call():
    w = WatchedDenoiser(_Net(delay=0.3), 0.1, report=False)
    errors: list[BaseException] = []

    def run():
        try:
            w(torch.ones(1, 1, 2), torch.ones(1))
        except ValueError as err:
            errors.append(err)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(errors) == 1 and "took longer than 0.1 s" in str(errors[0])


def test_watchdog_leaves_an_outer_timer_armed():
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        WatchedDenoiser(_Net(), 5, report=False)(torch.ones(1, 1, 2), torch.ones(1))
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL and 25 < left <= 30 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_check_timeout():
    assert check_timeout(None) is None and check_timeout(2) == 2.0
    for bad in (0, -1, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="model.timeout_s must be a positive number of seconds or null"):
            check_timeout(bad)

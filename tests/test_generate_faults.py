"""Issue 23: `python -m samplers generate` under faults and with tables that do not suit the model: shards carry a
checksum that --resume verifies, a full disk names what was kept, one-step students and out-of-range sigmas are
refused before any sampling."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from samplers import baselines
from samplers import __main__ as cli

REPO = Path(__file__).resolve().parents[1]
RUN = ["generate", "--solver", "euler", "--nfe", "3", "--n", "12", "--batch-size", "4", "--no-progress"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def samples(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        return z["samples"]


def test_resume_resamples_a_shard_that_fails_its_checksum(tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, _ = run([*RUN, "--out", str(tmp_path / "ref")], capsys)
    assert code == 0
    reference = samples(tmp_path / "ref")
    real_write = cli.write_outputs
    monkeypatch.setattr(cli, "write_outputs", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # killed at the end
    with pytest.raises(KeyboardInterrupt):
        run([*RUN, "--out", str(tmp_path / "o")], capsys)
    monkeypatch.setattr(cli, "write_outputs", real_write)
    shards = sorted((tmp_path / ".o.partial").glob("batch-*.npy"))
    assert len(shards) == 3 and all(cli._SHARD_NAME.fullmatch(p.name) for p in shards)
    data = bytearray(shards[1].read_bytes())
    data[-48:] = bytes(48)  # zero the last samples: still a valid .npy of the right shape
    shards[1].write_bytes(bytes(data))
    assert np.load(shards[1]).shape == (4, 1, 8, 8)
    code, _, err = run([*RUN, "--out", str(tmp_path / "o"), "--resume"], capsys)
    assert code == 0 and err.count("fails its checksum") == 1 and shards[1].name in err
    assert np.array_equal(samples(tmp_path / "o"), reference)


def test_disk_full_keeps_the_finished_shards_and_resume_finishes(tmp_path: Path, capsys, monkeypatch) -> None:
    real = cli.atomic_write_bytes
    calls = []

    def fill_after_two_shards(path: str, data: bytes) -> str:
        calls.append(path)
        if len([c for c in calls if "batch-" in c]) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(cli, "atomic_write_bytes", fill_after_two_shards)
    code, out, err = run([*RUN, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: writing batch 2 to ") and "(No space left on device); the 2 finished batch(es)" in err
    assert "--resume" in err and len(list((tmp_path / ".o.partial").glob("batch-*.npy"))) == 2
    monkeypatch.setattr(cli, "atomic_write_bytes", real)
    assert run([*RUN, "--out", str(tmp_path / "o"), "--resume"], capsys)[0] == 0
    assert run([*RUN, "--out", str(tmp_path / "ref")], capsys)[0] == 0
    assert np.array_equal(samples(tmp_path / "o"), samples(tmp_path / "ref"))


def test_disk_full_at_the_output_folder_says_every_batch_is_kept(tmp_path: Path, capsys, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "npz_bytes", full)
    code, _, err = run([*RUN, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nothing was written there and all 3 batches are kept in" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and len(list((tmp_path / ".o.partial").glob("batch-*.npy"))) == 3


@pytest.mark.parametrize("student", ["dsno-digits", "pagoda-patches16"])
def test_one_step_student_refuses_a_classic_solver(student: str, tmp_path: Path, capsys) -> None:
    model = f"edm:{REPO / 'checkpoints' / f'{student}.safetensors'}"
    code, _, err = run(["generate", "--solver", "euler", "--nfe", "4", "--model", model, "--n", "4",
                        "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "1-step student that serves tables of at most 1 evaluation(s); the table has 4" in err
    assert list(tmp_path.iterdir()) == []


def test_table_sigmas_beyond_the_models_range_are_refused(tmp_path: Path, capsys) -> None:
    path = baselines.build("euler", 4, sigma_max=5000.0).save(str(tmp_path / "far.safetensors"))
    model = f"diffusers:{REPO / 'checkpoints' / 'diffusers-digits'}"
    code, _, err = run(["generate", "--table", path, "--model", model, "--n", "4",
                        "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "evaluates sigma 5000, above the largest noise level this model supports (157.4" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.safetensors"]


def test_zero_terminal_snr_diffusers_model_is_accepted(tmp_path: Path, capsys) -> None:
    """``rescale_betas_zero_snr=true`` was documented as supported but refused (abar_{T-2} = 4.2e-9 is below the
    2^-24 put in place of abar_T = 0); it now loads with a finite, increasing sigma range and samples."""
    import json
    import shutil

    folder = tmp_path / "zsnr"
    shutil.copytree(REPO / "checkpoints" / "diffusers-digits", folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rescale_betas_zero_snr": True}))
    from samplers.models import load_diffusers

    den = load_diffusers(folder)
    assert 2e4 < den.sigma_max < 3e4 and bool((den.log_sigmas[1:] > den.log_sigmas[:-1]).all())
    code, _, err = run(["generate", "--solver", "euler", "--nfe", "3", "--sigma-max", str(den.sigma_max), "--n", "4",
                        "--model", f"diffusers:{folder}", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 0, err
    assert np.isfinite(samples(tmp_path / "o")).all()

"""`python -m samplers generate/info`: outputs, determinism across batch sizes and world sizes, errors."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from samplers import SolverTable, baselines, make_noise, nets, sample
from samplers.__main__ import main
from samplers.denoisers import GaussianMixture
from samplers.images import make_grid, to_uint8

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--no-progress"]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in this process -> (exit code, stdout, stderr); argparse exits are caught."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def generate(tmp: Path, name: str, capsys, *args: str) -> dict:
    code, _, err = run_main(["generate", "--out", str(tmp / name), *QUIET, *args], capsys)
    assert code == 0, err
    with np.load(tmp / name / "samples.npz") as z:
        return {k: z[k] for k in z.files}


def read_png(path: Path) -> np.ndarray:
    """Minimal PNG decoder (8-bit grey/RGB, filter 0 only) that checks every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, kinds = 8, b"", []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        kinds.append(kind)
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and depth == 8
    c = {0: 1, 2: 3}[color]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(h, w, c)


# --- outputs -------------------------------------------------------------------------------------
def test_generate_writes_npz_and_png(tmp_path, capsys) -> None:
    z = generate(tmp_path, "a", capsys, "--solver", "dpmpp_2m", "--nfe", "8", "--n", "10", "--seed", "5")
    assert z["samples"].shape == (10, 1, 8, 8) and z["samples"].dtype == np.float32
    assert z["seeds"].tolist() == list(range(5, 15))
    meta = json.loads(str(z["metadata"]))
    assert meta["table"]["method"] == "dpmpp_2m" and meta["model"] == "gmm" and "generate" in meta["command"]
    assert meta["model_fingerprint"] == GaussianMixture.random().fingerprint()
    # same as calling the runtime directly, and deterministic
    table = baselines.build("dpmpp_2m", nfe=8)
    direct = sample(table, GaussianMixture.random(), make_noise(table, (1, 8, 8), range(5, 15)))
    assert np.array_equal(z["samples"], direct.numpy())
    again = generate(tmp_path, "b", capsys, "--solver", "dpmpp_2m", "--nfe", "8", "--n", "10", "--seed", "5")
    assert np.array_equal(z["samples"], again["samples"])
    # the PNG decodes to the grid of the samples: 4 x 3 tiles of 32 x 32 (8 x 8 upscaled 4x), 1 px padding
    png = read_png(tmp_path / "a" / "grid.png")
    assert png.shape == (1 + 3 * 33, 1 + 4 * 33, 1)
    assert np.array_equal(png, make_grid(z["samples"], scale=4))
    first = to_uint8(z["samples"][:1])[0]
    assert np.array_equal(png[1:33:4, 1:33:4], first)


def test_png_rgb_grid(tmp_path) -> None:
    from samplers.images import write_png_grid

    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    path = write_png_grid(images, str(tmp_path / "g.png"), nrow=2, scale=2, pad=0)
    png = read_png(Path(path))
    assert png.shape == (8, 20, 3)
    assert np.array_equal(png[::2, :10:2], to_uint8(images[:1])[0])
    assert png[0, 0, 0] == 0 and png[-1, -1, -1] == 255
    with pytest.raises(ValueError, match="C = 1 or 3"):
        make_grid(torch.zeros(1, 2, 4, 4))


def test_table_file_matches_solver(tmp_path, capsys) -> None:
    table = baselines.build("unipc", nfe=6, schedule="logsnr", sigma_min=0.01, sigma_max=50.0, order=3)
    path = table.save(str(tmp_path / "t.safetensors"))
    from_file = generate(tmp_path, "f", capsys, "--table", path, "--n", "12", "--batch-size", "5")
    from_solver = generate(
        tmp_path, "s", capsys, "--solver", "unipc", "--order", "3", "--nfe", "6", "--schedule", "logsnr",
        "--sigma-min", "0.01", "--sigma-max", "50", "--n", "12",
    )
    assert np.array_equal(from_file["samples"], from_solver["samples"])
    assert json.loads(str(from_file["metadata"]))["table_file"] == path


def test_batch_size_does_not_change_samples(tmp_path, capsys) -> None:
    args = ("--solver", "ddim", "--eta", "0.5", "--nfe", "6", "--n", "64", "--model", "gmm-ring")
    big = generate(tmp_path, "b64", capsys, *args, "--batch-size", "64")
    small = generate(tmp_path, "b32", capsys, *args, "--batch-size", "32")
    assert big["samples"].shape == (64, 2)
    assert np.array_equal(big["samples"], small["samples"])
    assert not (tmp_path / "b64" / "grid.png").exists()  # 2-D samples: no image grid


def test_edm_model_and_info(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    config = {"arch": "unet", "channels": 8, "precond": "edm", "sigma_data": 0.5}
    net_path = nets.save_net(nets.build_net(config), config, str(tmp_path / "teacher.safetensors"))
    z = generate(tmp_path, "e", capsys, "--solver", "euler", "--nfe", "3", "--n", "3", "--model", f"edm:{net_path}", "--dtype", "float64")
    assert z["samples"].shape == (3, 1, 8, 8) and np.all(np.isfinite(z["samples"]))
    assert json.loads(str(z["metadata"]))["model_fingerprint"] == nets.load_denoiser(net_path).fingerprint()
    # a table fitted to the (float32) model is accepted when the model runs in float64
    den = nets.load_denoiser(net_path)
    euler = baselines.build("euler", 3)
    fitted = SolverTable(euler.sigmas, euler.coef, {**euler.metadata, "model_fingerprint": den.fingerprint()})
    fitted_path = fitted.save(str(tmp_path / "fitted.safetensors"))
    z64 = generate(tmp_path, "e64", capsys, "--table", fitted_path, "--n", "3", "--model", f"edm:{net_path}", "--dtype", "float64")
    assert np.array_equal(z64["samples"], z["samples"])
    code, out, _ = run_main(["info", net_path], capsys)
    assert code == 0 and "network unet" in out and "sample shape [1, 8, 8]" in out
    table = baselines.build("heun", nfe=5).save(str(tmp_path / "h.safetensors"))
    code, out, _ = run_main(["info", table], capsys)
    assert code == 0 and "heun table, nfe 5, noise vectors 1" in out and '"method": "heun"' in out


def test_class_conditional_label(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    config = {"arch": "unet", "channels": 8, "num_classes": 10}
    path = nets.save_net(nets.build_net(config), config, str(tmp_path / "cond.safetensors"))
    args = ("--solver", "euler", "--nfe", "2", "--n", "2", "--model", f"edm:{path}")
    three, five = (generate(tmp_path, f"l{k}", capsys, *args, "--label", str(k))["samples"] for k in (3, 5))
    assert three.shape == (2, 1, 8, 8) and not np.array_equal(three, five)
    code, _, err = run_main(["generate", *args, "--label", "10", "--out", str(tmp_path / "x"), *QUIET], capsys)
    assert code == 2 and err.strip() == f"error: --model edm:{path}: --label must be an integer in [0, 10), got 10."


def test_diffusers_model(tmp_path, capsys) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    unet.save_pretrained(str(tmp_path / "vp"))
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(str(tmp_path / "vp"))
    z = generate(tmp_path, "d", capsys, "--solver", "dpmpp_2m", "--nfe", "4", "--n", "3", "--model", f"diffusers:{tmp_path / 'vp'}")
    assert z["samples"].shape == (3, 1, 8, 8) and np.all(np.isfinite(z["samples"]))
    schedule = json.loads(str(z["metadata"]))["table"]["schedule"]
    assert 0.002 < schedule["sigma_min"] < 0.02 and schedule["sigma_max"] == 80.0  # clamped to the model's range


# --- several processes -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_byte_identical(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["generate", "--solver", "dpmpp_3m", "--nfe", "5", "--num-samples", "11", "--batch-size", "3", "--seed", "3", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "samplers", *args, "--out", str(tmp_path / "one")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "samplers"]
    two = subprocess.run([*launcher, *args, "--out", str(tmp_path / "two")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert a["samples"].shape == (11, 1, 8, 8)
        assert a["samples"].tobytes() == b["samples"].tobytes()
        assert np.array_equal(a["seeds"], b["seeds"])
        assert [json.loads(str(z["metadata"]))["world_size"] for z in (a, b)] == [1, 2]


def test_no_command_prints_help() -> None:
    result = subprocess.run([sys.executable, "-m", "samplers"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout and "info" in result.stdout


# --- user errors: one line, exit status 2 ------------------------------------------------------
@pytest.fixture()
def bad_files(tmp_path) -> dict[str, str]:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    nan_table = baselines.build("euler", nfe=3)
    nan_table.coef[1, 0] = float("nan")
    nan_path = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file({"sigmas": nan_table.sigmas, "coef": nan_table.coef}, str(nan_path),
              metadata={"format": "samplers.table", "format_version": "1", "metadata": "{}"})
    return {"garbage": str(garbage), "nan": str(nan_path), "missing": str(tmp_path / "missing.safetensors"), "dir": str(tmp_path)}


ERRORS = [
    (["--table", "{garbage}"], r"garbage\.safetensors: (not a readable safetensors file|truncated or corrupt table file)"),
    (["--table", "{missing}"], r"missing\.safetensors: no such table file\."),
    (["--table", "{nan}"], r"nan\.safetensors: coef contains NaN or infinite values"),
    (["--solver", "rk4", "--nfe", "4"], r"unknown solver 'rk4'; valid: euler, heun"),
    (["--solver", "euler", "--nfe", "0"], r"nfe must be a positive integer, got 0\."),
    (["--solver", "heun", "--nfe", "4"], r"heun needs an odd NFE .* got 4\."),
    (["--solver", "euler", "--nfe", "x"], r"argument --nfe: invalid int value: 'x'"),
    (["--solver", "euler"], r"--solver euler needs --nfe N\."),
    (["--solver", "euler", "--nfe", "4", "--eta", "0.5"], r"euler does not take option\(s\) eta"),
    (["--solver", "euler", "--nfe", "4", "--sigma-min", "90"], r"sigma_min"),
    ([], r"give either --table FILE or --solver NAME with --nfe N"),
    (["--table", "{garbage}", "--solver", "euler", "--nfe", "3"], r"give either --table FILE or --solver NAME"),
    (["--solver", "euler", "--nfe", "3", "--model", "edm:{missing}"], r"missing\.safetensors: no such network file\."),
    (["--solver", "euler", "--nfe", "3", "--model", "diffusers:{missing}"], r"missing\.safetensors' does not exist"),
    (["--solver", "euler", "--nfe", "3", "--model", "stylegan"], r"unknown model 'stylegan'; valid: gmm, gmm-ring"),
    (["--solver", "euler", "--nfe", "3", "--n", "0"], r"--n and --batch-size must be positive"),
    (["--solver", "euler", "--nfe", "3", "--label", "3"], r"--model gmm: --label is set, but this model is not class-conditional\."),
    (["--solver", "euler", "--nfe", "3", "--device", "gpu0"], r"unknown device 'gpu0'"),
    (["--table", "{nan}", "--schedule", "logsnr"], r"--table fixes the solver; drop --schedule\."),
    (["--solver", "euler", "--nfe", "3", "--dtype", "float16"], r"argument --dtype: invalid choice: 'float16'"),
]


@pytest.mark.parametrize("argv, message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_user_errors_are_one_line_exit_2(bad_files, capsys, argv: list[str], message: str) -> None:
    argv = [a.format(**bad_files) for a in argv]
    code, out, err = run_main(["generate", *argv, "--out", os.path.join(bad_files["dir"], "o"), *QUIET], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]


def test_error_from_the_command_line_has_no_traceback(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "samplers", "generate", "--table", str(tmp_path / "x.safetensors"), "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.safetensors'}: no such table file."]


def test_fingerprint_mismatch(tmp_path, capsys) -> None:
    table = baselines.build("euler", nfe=4)
    ring = GaussianMixture.ring()
    made_for_ring = SolverTable(table.sigmas, table.coef, {**table.metadata, "model_fingerprint": ring.fingerprint()})
    path = made_for_ring.save(str(tmp_path / "ring.safetensors"))
    code, _, err = run_main(["generate", "--table", path, "--model", "gmm", "--out", str(tmp_path / "o"), *QUIET], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"made for model fingerprint {ring.fingerprint()}, but the model in use has fingerprint" in err
    assert generate(tmp_path, "ok", capsys, "--table", path, "--model", "gmm-ring", "--n", "2")["samples"].shape == (2, 2)


# --- hostile inputs and faults (issue 11) ------------------------------------------------------
MORE_ERRORS = [
    (["--solver", "euler", "--nfe", "3", "--device", "meta"], r"--device meta cannot run samples"),
    (["--solver", "euler", "--nfe", "3", "--rho", "inf"], r"--rho must be a finite number, got inf\."),
    (["--solver", "euler", "--nfe", "3", "--sigma-max", "1e30"], r"--sigma-max 1e\+30 is above the largest noise level"),
    (["--solver", "euler", "--nfe", "3", "--seed", str(2**63 - 2), "--n", "5"], r"must fit in 64 bits"),
    (["--solver", "euler", "--nfe", "100000000"], r"--nfe 100000000 is too large: at most 10000"),
    (["--solver", "euler", "--nfe", "3", "--n", str(10**13)], r"--n 10000000000000 samples take"),
]


@pytest.mark.parametrize("argv, message", MORE_ERRORS, ids=[str(i) for i in range(len(MORE_ERRORS))])
def test_more_user_errors_before_any_work(tmp_path, capsys, argv: list[str], message: str) -> None:
    code, out, err = run_main(["generate", *argv, "--out", str(tmp_path / "o"), *QUIET], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_out_folder_checks_and_overwrite(tmp_path, capsys) -> None:
    args = ["generate", "--solver", "euler", "--nfe", "3", "--n", "4", *QUIET]
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "is below the file")):
        code, _, err = run_main([*args, "--out", str(out)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    first = generate(tmp_path, "o", capsys, "--solver", "euler", "--nfe", "3", "--n", "4")
    code, _, err = run_main([*args, "--seed", "9", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "already holds results (grid.png, samples.npz); add --overwrite" in err
    with np.load(tmp_path / "o" / "samples.npz") as z:  # untouched
        assert np.array_equal(z["samples"], first["samples"])
    second = generate(tmp_path, "o", capsys, "--solver", "euler", "--nfe", "3", "--n", "4", "--seed", "9", "--overwrite")
    assert second["seeds"].tolist() == [9, 10, 11, 12]
    assert sorted(os.listdir(tmp_path)) == ["file", "o"]  # no temporary folder or shards left behind
    assert sorted(os.listdir(tmp_path / "o")) == ["grid.png", "samples.npz"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run_main([*args, "--overwrite", "--out", str(tmp_path / "mine")], capsys)
    assert code == 2 and "holds other files (notes.txt)" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_non_finite_samples_name_the_first_bad_step(tmp_path, capsys) -> None:
    table = baselines.build("euler", nfe=30)
    coef = table.coef.clone()
    for i in range(1, 31):
        coef[i, table.x(i - 1)] = 1e12  # allowed coefficients; x_i ~ 1e12^i: the mixture's x^2 overflows at i = 13
    path = SolverTable(table.sigmas, coef).save(str(tmp_path / "bad.safetensors"))
    code, out, err = run_main(["generate", "--table", path, "--dtype", "float64", "--out", str(tmp_path / "o"), *QUIET], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: samples became NaN or infinite at the model output of evaluation 13 "
                                        f"(sigma {float(table.sigmas[13]):.4g}), first for seed 0 (batch of seeds 0..63); the table, its sigma "
                                        f"range or the network is unusable here (nothing of this batch was written)."]
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_killed_run_resumes_to_byte_identical_output(tmp_path, capsys) -> None:
    """SIGKILL a run after a few batches; --resume samples only the rest and the files equal an uninterrupted run's."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "samplers", "generate", "--solver", "dpmpp_2m", "--nfe", "50", "--n", "600",
           "--batch-size", "20", "--seed", "11", "--out", str(out), "--no-progress"]
    partial = tmp_path / ".o.partial"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(partial.glob("batch-*.npy"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(partial.glob("batch-*.npy")))
    assert 3 <= done < 30 and not out.exists(), done
    code, _, err = run_main(cmd[3:], capsys)  # without --resume: refused, shards kept
    assert code == 2 and "add --resume to finish it" in err and len(list(partial.glob("batch-*.npy"))) == done
    resumed = subprocess.run([*cmd, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    got = {name: (out / name).read_bytes() for name in ("samples.npz", "grid.png")}
    straight = subprocess.run([*cmd, "--overwrite"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    for name, data in got.items():
        assert (out / name).read_bytes() == data, name
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (600, 1, 8, 8) and z["seeds"].tolist() == list(range(11, 611))


def test_resume_refuses_a_run_with_other_settings(tmp_path, capsys) -> None:
    from samplers.__main__ import partial_dir, run_identity, write_shard

    args = ["generate", "--solver", "euler", "--nfe", "3", "--n", "8", "--batch-size", "4", "--out", str(tmp_path / "o"), *QUIET]
    ns = __import__("argparse").Namespace(model="gmm", n=8, seed=0, batch_size=4, dtype="float32", label=None)
    ident = run_identity(ns, baselines.build("euler", 3), GaussianMixture.random().fingerprint(), (1, 8, 8), torch.device("cpu"))
    write_shard(partial_dir(str(tmp_path / "o")), ident, 0, np.full((4, 1, 8, 8), 7.0, np.float32))  # a planted first batch
    code, _, err = run_main([*args, "--resume", "--seed", "1"], capsys)
    assert code == 2 and "had seed=0, this command has seed=1" in err
    z = generate(tmp_path, "o", capsys, "--solver", "euler", "--nfe", "3", "--n", "8", "--batch-size", "4", "--resume")
    assert np.all(z["samples"][:4] == 7.0) and not np.any(z["samples"][4:] == 7.0)  # batch 0 came from its shard

"""What `samplers generate` promises about determinism, checked on the shipped conv-net teacher (float32).

At a fixed --batch-size the output is byte-identical for any number of processes (batches have fixed seed
boundaries and are dealt round-robin to ranks). Across batch sizes a float32 conv net may differ in the last
bits (its kernels block the batch differently), which the README states; that is measured here, not promised.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARGS = ["generate", "--solver", "dpmpp_2m", "--nfe", "4", "--model", "edm", "--num-samples", "7", "--seed", "5",
        "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        return z["samples"]


def test_conv_teacher_world_size_one_and_two_byte_identical(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "samplers", *ARGS, "--batch-size", "3", "--out", str(tmp_path / "one")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "samplers"]
    two = subprocess.run([*launcher, *ARGS, "--batch-size", "3", "--out", str(tmp_path / "two")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert a.shape == (7, 1, 8, 8) and a.dtype == np.float32
    assert a.tobytes() == b.tobytes()
    # another batch split of the same seeds: the same samples up to float32 rounding of the conv kernels
    three = subprocess.run([sys.executable, "-m", "samplers", *ARGS, "--batch-size", "7", "--out", str(tmp_path / "b7")],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert three.returncode == 0, three.stderr[-3000:]
    np.testing.assert_allclose(_samples(tmp_path / "b7"), a, rtol=0, atol=1e-4)


def test_text_to_image_world_size_one_and_two_byte_identical(tmp_path: Path) -> None:
    """The shipped tiny Stable Diffusion folder with prompts and guidance: the same decoded images (npz and PNGs) from one
    process and from two."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["generate", "--solver", "dpmpp_2m", "--nfe", "3", "--model", f"diffusers:{REPO / 'checkpoints' / 'sd-tiny'}",
            "--prompt", "a red seven on a blue background", "--prompt", "a green two on a wood background",
            "--guidance", "7.5", "--num-samples", "5", "--seed", "11", "--batch-size", "2", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "samplers", *args, "--out", str(tmp_path / "one")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "samplers"]
    two = subprocess.run([*launcher, *args, "--out", str(tmp_path / "two")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert a.shape == (5, 3, 32, 32) and a.tobytes() == b.tobytes()
    pngs = sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert pngs == [f"{s:08d}.png" for s in range(11, 16)]
    assert all((tmp_path / "one" / "images" / p).read_bytes() == (tmp_path / "two" / "images" / p).read_bytes() for p in pngs)

"""SolverTable validation and the executor, checked against loops written out in the test."""

import numpy as np
import pytest
import torch

from samplers import SolverTable, TableError, baselines, make_noise, sample
from samplers.denoisers import GaussianMixture
from samplers.table import TableRun, _make_plan

SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(shape=SHAPE, components=4, seed=1)


def euler_table(n=3):
    return baselines.build("euler", n)


# --- validation --------------------------------------------------------------------------------
def test_bad_shapes_and_values_are_one_sentence_errors():
    t = euler_table(3)
    sig, coef = t.sigmas.numpy(), t.coef.numpy()
    with pytest.raises(TableError, match=r"coef must have shape \[N\+1, K\+2N\]"):
        SolverTable(sig, coef[:-1])
    with pytest.raises(TableError, match="K >= 1"):
        SolverTable(sig, coef[:, 1:])
    with pytest.raises(TableError, match="sigmas must be positive"):
        SolverTable(np.array([80.0, 0.0, 1.0]), coef)
    with pytest.raises(TableError, match="sigmas contain NaN"):
        SolverTable(np.array([80.0, np.nan, 1.0]), coef)
    bad = coef.copy()
    bad[2, 0] = np.inf
    with pytest.raises(TableError, match=r"coef contains NaN or infinite values \(first at row 2, column 0\)"):
        SolverTable(sig, bad)
    with pytest.raises(TableError, match="1-D"):
        SolverTable(np.zeros((0,)), np.zeros((1, 1)))


def test_causality_is_enforced():
    t = euler_table(3)
    coef = t.coef.numpy().copy()
    coef[1, t.d(1)] = 0.5  # x_1 may not use d_1
    with pytest.raises(TableError, match="causality violated: row 1 uses x_1 or d_1"):
        SolverTable(t.sigmas, coef)
    coef = t.coef.numpy().copy()
    coef[3, t.x(2)] = 0.5  # the output row may use everything
    SolverTable(t.sigmas, coef)


def test_column_layout():
    t = baselines.build("ddim", 3, eta=0.5)
    assert (t.nfe, t.n_noise) == (3, 4)
    assert t.column_names() == ["e0", "e1", "e2", "e3", "x0", "x1", "x2", "d0", "d1", "d2"]
    assert (t.e(1), t.x(0), t.d(2)) == (1, 4, 9)


# --- executor ----------------------------------------------------------------------------------
def test_euler_table_equals_written_out_euler_loop(gmm):
    sig = baselines.schedules.karras(6)
    table = baselines.build("euler", 6)
    noise = make_noise(table, SHAPE, range(5), dtype=torch.float64)
    x = sig[0] * noise[0]
    for i in range(6):
        d = gmm(x, torch.full((5,), sig[i], dtype=torch.float64))
        nxt = sig[i + 1] if i + 1 < 6 else 0.0
        x = x + (nxt - sig[i]) * (x - d) / sig[i]
    torch.testing.assert_close(sample(table, gmm, noise), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,nfe", [("euler", 4), ("heun", 7), ("dpmpp_3m", 5), ("unipc", 6), ("ddim", 3)])
def test_exactly_nfe_evaluations_and_callback(gmm, name, nfe):
    table = baselines.build(name, nfe)
    seen = []
    calls = []

    def counting(x, sigma, cond=None):
        calls.append(1)
        return gmm(x, sigma)

    noise = make_noise(table, SHAPE, range(3))
    sample(table, counting, noise, callback=lambda i, x, d, s: seen.append((i, float(s[0]), x.shape, d.shape)))
    assert len(calls) == nfe
    assert [i for i, *_ in seen] == list(range(nfe))
    assert np.allclose([s for _, s, *_ in seen], table.sigmas.numpy(), rtol=1e-6)
    assert all(xs == (3, *SHAPE) and ds == (3, *SHAPE) for *_, xs, ds in seen)


def test_dtype_and_cond_pass_through(gmm):
    table = euler_table(2)
    got = []

    def den(x, sigma, cond=None):
        got.append((x.dtype, sigma.dtype, sigma.shape, cond))
        return gmm(x, sigma)

    out = sample(table, den, make_noise(table, SHAPE, range(4)), cond="label")
    assert out.dtype == torch.float32 and out.shape == (4, *SHAPE)
    assert got[0] == (torch.float32, torch.float32, (4,), "label")


def test_noise_shape_mismatch_message(gmm):
    table = baselines.build("ddim", 3, eta=1.0)
    with pytest.raises(ValueError, match=r"noise must have shape \[K, B, \.\.\.\] with K = 4"):
        sample(table, gmm, torch.zeros(1, 2, *SHAPE))


def test_plan_keeps_constant_memory_for_long_euler():
    table = baselines.build("euler", 1000)
    n, k = table.nfe, table.n_noise
    plan = _make_plan(n, k, table.support(), table.coef.numpy())
    live, peak = set(plan.noise_used), 0
    for i in range(n):
        live |= {k + i, k + n + i}
        peak = max(peak, len(live))
        live -= set(plan.free_after[i])
    assert peak <= 4  # x_{i-1}, d_{i-1} (inputs of row i) and x_i, d_i: independent of N
    assert all(len(cols) <= 2 for cols in plan.columns)


def _run_stepwise(table, den, noise, draw=None):
    """The executor driven one evaluation at a time, as a diffusers scheduler drives it."""
    run = TableRun(table, noise if draw is None else {0: noise[0]})
    for i in range(table.nfe):
        x = run.input(i, draw)
        run.record(i, x, den(x, table.sigmas[i].to(x.dtype).expand(x.shape[0])))
    return run.output(draw)


@pytest.mark.parametrize("name,options", [("euler", {}), ("dpmpp_3m", {}), ("unipc", {"order": 3}), ("ddim", {"eta": 1.0})])
def test_stepwise_run_equals_sample_bit_for_bit(gmm, name, options):
    """TableRun one row at a time is sample() exactly, also when noise vectors are drawn only when a row first reads
    them (in the order of the rows that need them: e_0 given, e_1.. one per stochastic step)."""
    table = baselines.build(name, 5, **options)
    noise = make_noise(table, SHAPE, range(3))
    ref = sample(table, gmm, noise)
    assert torch.equal(_run_stepwise(table, gmm, noise), ref)
    drawn = []
    out = _run_stepwise(table, gmm, noise, draw=lambda k: drawn.append(k) or noise[k])
    assert torch.equal(out, ref)
    assert drawn == sorted(drawn) == [c for c in range(1, table.n_noise) if table.support()[:, c].any()]


def test_run_frees_buffers_by_the_plan():
    """After evaluation i the run holds exactly the vectors a later row reads: for Euler x_i, d_i (constant memory
    in N); a stochastic table also drops each noise vector after the row that reads it last."""
    for table in (baselines.build("euler", 200), baselines.build("ddim", 4, eta=1.0)):
        n, k, support = table.nfe, table.n_noise, table.support()
        run = TableRun(table, make_noise(table, SHAPE, range(2)))
        for i in range(n):
            x = run.input(i)
            run.record(i, x, x)
            exists = [c for c in range(k + 2 * n) if c < k or (c - k) % n <= i]
            assert run.held() == [c for c in exists if support[i + 1 :, c].any()]
            assert table.nfe < 200 or len(run.held()) <= 2
        assert run.output().shape == (2, *SHAPE)


def test_run_refuses_missing_vectors_and_bad_noise_keys(gmm):
    euler = euler_table(3)
    run = TableRun(euler, make_noise(euler, SHAPE, range(2)))
    with pytest.raises(ValueError, match=r"row 1 reads x_0, which this run does not hold \(record each evaluation"):
        run.input(1)  # evaluation 0 not recorded
    table = baselines.build("ddim", 3, eta=1.0)
    noise = make_noise(table, SHAPE, range(2))
    run = TableRun(table, {0: noise[0]})
    x = run.input(0)
    run.record(0, x, gmm(x, table.sigmas[:1].float().expand(2)))
    with pytest.raises(ValueError, match=r"row 1 reads e_1, which this run does not hold"):
        run.input(1)
    with pytest.raises(ValueError, match=r"noise must map noise indices in \[0, 4\) to tensors, got keys \[7\]"):
        TableRun(table, {7: noise[0]})
    with pytest.raises(ValueError, match=r"noise must have shape \[K, B, \.\.\.\] with K = 4"):
        TableRun(table, noise[:2])


def test_no_module_imports_the_executors_private_names():
    """One executor with a public API (SolverTable, TableRun, sample): no other samplers module imports a private
    (underscore) name of samplers.table."""
    import ast
    from pathlib import Path

    import samplers

    bad = []
    for path in sorted(Path(samplers.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "table":
                bad += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_zero_row_and_explicit_support(gmm):
    table = euler_table(3)
    noise = make_noise(table, SHAPE, range(2), dtype=torch.float64)
    full = np.zeros((4, 1 + 6), dtype=bool)  # every causal entry: e_0, x_j and d_j for j < i
    for i in range(4):
        full[i, 0] = True
        full[i, 1 : 1 + i] = True
        full[i, 4 : 4 + i] = True
    torch.testing.assert_close(sample(table, gmm, noise, support=full), sample(table, gmm, noise))
    coef = torch.zeros_like(table.coef)
    coef[0, 0] = 80.0
    assert torch.all(sample(SolverTable(table.sigmas, coef), gmm, noise) == 0)


# --- noise and batch independence --------------------------------------------------------------
def test_make_noise_is_per_seed():
    table = baselines.build("ddim", 2, eta=1.0)
    a = make_noise(table, (2, 3), [5, 6, 7], dtype=torch.float64)
    b = make_noise(table, (2, 3), [7], dtype=torch.float64)
    assert a.shape == (3, 3, 2, 3)
    assert torch.equal(a[:, 2], b[:, 0])
    assert torch.equal(make_noise(table, (2, 3), [7]), b.float())
    with pytest.raises(ValueError, match="at least one seed"):
        make_noise(table, (2,), [])


def test_batch_of_64_equals_two_batches_of_32(gmm):
    table = baselines.build("dpmpp_2m", 6)
    whole = sample(table, gmm, make_noise(table, SHAPE, range(64)))
    parts = [sample(table, gmm, make_noise(table, SHAPE, range(a, a + 32))) for a in (0, 32)]
    assert torch.equal(whole, torch.cat(parts))


# --- differentiability -------------------------------------------------------------------------
def _learnable(table):
    coef = table.coef.clone().requires_grad_(True)
    sigmas = table.sigmas.clone().requires_grad_(True)
    return coef, sigmas, SolverTable(sigmas, coef, check=False)


def test_gradient_matches_finite_differences(gmm):
    base = baselines.build("dpmpp_2m", 4)
    noise = make_noise(base, SHAPE, range(3), dtype=torch.float64)
    coef, sigmas, table = _learnable(base)
    support = base.support()
    loss = sample(table, gmm, noise, support=support).square().sum()
    loss.backward()

    def f(c, s):
        return sample(SolverTable(s, c, check=False), gmm, noise, support=support).square().sum().item()

    eps = 1e-6
    for r, c in [(1, base.x(0)), (4, base.d(3)), (3, base.d(1))]:
        dc = torch.zeros_like(base.coef)
        dc[r, c] = eps
        fd = (f(base.coef + dc, base.sigmas) - f(base.coef - dc, base.sigmas)) / (2 * eps)
        assert coef.grad[r, c].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)
    ds = torch.zeros_like(base.sigmas)
    ds[2] = eps
    fd = (f(base.coef, base.sigmas + ds) - f(base.coef, base.sigmas - ds)) / (2 * eps)
    assert sigmas.grad[2].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_checkpointed_gradient_equals_plain_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    net = net.double()

    def den(x, sigma, cond=None):
        return x / (1 + sigma[:, None, None, None] ** 2) + net(x).reshape(x.shape) * 0.1

    base = baselines.build("dpmpp_3m", 5)
    noise = make_noise(base, SHAPE, range(4), dtype=torch.float64).requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        noise.grad = None
        coef, sigmas, table = _learnable(base)
        sample(table, den, noise, support=base.support(), checkpoint=ckpt).square().mean().backward()
        grads.append([coef.grad, sigmas.grad, noise.grad, *[p.grad.clone() for p in net.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_host_synchronisation_inside_the_loop(gmm, monkeypatch):
    """Reading tensor values on the host (.item, .tolist, .cpu, .numpy, bool) would stall a GPU each
    step; the executor must not do it once the plan exists, learned tables included."""
    table = baselines.build("unipc", 6, order=3)
    noise = make_noise(table, SHAPE, range(4))
    coef, sigmas, learned = _learnable(table)
    support = table.support()
    sample(table, gmm, noise)  # plan the table once, outside the guarded region

    def forbid(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation via Tensor.{name} inside sample()")

        return fail

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    with pytest.raises(AssertionError, match="host synchronisation"):
        torch.ones(1).item()  # the guard is live
    fast = sample(table, gmm, noise)
    slow = sample(learned, gmm, noise, support=support, checkpoint=True)
    monkeypatch.undo()
    torch.testing.assert_close(fast, slow.detach())


def test_in_place_edit_is_never_stale_and_is_revalidated():
    """The cached plan is keyed on coef/sigmas versions: an edit after a run changes the next run's output,
    and an edit that breaks causality is an error instead of a silent stale plan."""
    from samplers.denoisers import GaussianMixture

    gmm = GaussianMixture.random(shape=(3,), seed=0)
    table = baselines.build("euler", 4)
    noise = make_noise(table, (3,), range(5), dtype=torch.float64)
    first = sample(table, gmm, noise)
    table.coef[4] = 0.0
    table.coef[4, table.x(3)] = 1.0  # output = the last denoiser input instead of its output
    edited = sample(table, gmm, noise)
    assert not torch.equal(first, edited)
    assert torch.equal(edited, sample(SolverTable(table.sigmas.clone(), table.coef.clone()), gmm, noise))
    table.sigmas = table.sigmas * 1.0  # replaced tensor: also replanned
    assert torch.equal(edited, sample(table, gmm, noise))
    table.coef[1, table.x(2)] = 0.5  # row 1 may not read x_2
    with pytest.raises(TableError, match="causality"):
        sample(table, gmm, noise)


def test_inference_mode_table_edits_are_not_stale():
    """Tables built under torch.inference_mode have no version counter; edits are still seen (value comparison)."""
    from samplers.denoisers import GaussianMixture

    gmm = GaussianMixture.random(shape=(3,), seed=0)
    with torch.inference_mode():
        base = baselines.build("euler", 4)
        table = SolverTable(torch.as_tensor(base.sigmas), torch.as_tensor(base.coef))
        noise = make_noise(table, (3,), range(4), dtype=torch.float64)
        first = sample(table, gmm, noise)
        table.coef[4] = 0.0
        table.coef[4, table.x(3)] = 1.0
        assert not torch.equal(first, sample(table, gmm, noise))

"""The learners on text-to-image models (issue 26 item 1, the plumbing): LD3, IIA and DDSS (loss=match) run on a tiny
random Stable Diffusion pipeline with 2 prompts and guidance 3 from the command line, write tables that record the
guidance scale and latent shape and that ``python -m samplers generate`` serves; the sample of seed s is solved with
prompt s mod P wherever a learner makes, splits, shuffles or moves its noises (checked on every denoiser call that
starts from pure noise, against the seed that noise came from), and a 2-prompt fit differs from one where every row
got prompt 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from tiny_t2i import save_tiny_sd  # noqa: E402

from samplers import SolverTable, baselines, make_noise, sample  # noqa: E402
from samplers import __main__ as samplers_cli  # noqa: E402
from samplers.models import load  # noqa: E402
from samplers.t2i import sigma_range  # noqa: E402

from optimize.cli import main as optimize_main  # noqa: E402
from optimize.base.conds import cond_rows  # noqa: E402
from optimize.base.seeds import FIT_SEED_OFFSET, VAL_SEED_OFFSET, seed_range  # noqa: E402
from optimize.data.models import Model  # noqa: E402
from optimize.evaluation import metrics  # noqa: E402
from optimize.evaluation.judge import Judge  # noqa: E402
from optimize.methods import ddss, iia, ld3  # noqa: E402
from optimize.training.distill import teacher_targets  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red seven on a blue background", "a green two on a wood background"]
PROMPTS3 = [*PROMPTS, "a yellow nine on grass"]  # 3 prompts: a row shifted by an even offset gets another prompt too
W = 3.0


def channel_means():
    """A feature map for the judge of decoded images (``features=test_t2i_learners:channel_means``): per-channel means."""
    return lambda x: x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("t2i-learners") / "sd")


@pytest.fixture(scope="module")
def model(sd):
    """The tiny SD pipeline with PROMPTS at guidance W (samplers.models.load: denoiser, shape, cond_of, decode)."""
    return load(f"diffusers:{sd}", prompts=PROMPTS, guidance=W)


@pytest.fixture(scope="module")
def model3(sd):
    """The same pipeline with PROMPTS3."""
    return load(f"diffusers:{sd}", prompts=PROMPTS3, guidance=W)


class Recorder(torch.nn.Module):
    """The model's denoiser, recording for every call that starts from pure noise (sigma = sigma_max, x = sigma_max e)
    which seed each row's noise came from (nearest of ``noises``) and the cond the row was given."""

    def __init__(self, denoiser, noises: dict[int, torch.Tensor], sigma_max: float):
        super().__init__()
        self.inner, self.sigma_max, self.n_prompts = denoiser, sigma_max, len(denoiser.prompts)
        self.seeds = list(noises)
        self.table = torch.stack([noises[s].flatten().double() for s in self.seeds])
        self.seen: list[tuple[int, int]] = []  # (seed of the row's noise, the row's cond)

    def forward(self, x, sigma, cond=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if cond is not None and bool((s - self.sigma_max).abs().max() < 1e-6 * self.sigma_max):
            e = x.detach().double().flatten(1) / self.sigma_max
            dist = torch.cdist(e, self.table)
            near = dist.argmin(1)
            assert bool((dist.min(1).values < 0.05).all())  # LD3's moves stay inside a ball of radius 0.016
            self.seen += [(self.seeds[int(j)], int(c)) for j, c in zip(near, torch.as_tensor(cond).reshape(-1))]
        return self.inner(x, sigma, cond)

    def check(self) -> None:
        """Every row was given its own seed's prompt; every prompt was seen."""
        assert self.seen and all(c == s % self.n_prompts for s, c in self.seen), self.seen[:8]
        assert {c for _, c in self.seen} == set(range(self.n_prompts))


def noises_of(seeds, shape) -> dict[int, torch.Tensor]:
    return dict(zip(seeds, make_noise(1, shape, list(seeds))[0]))


def all_prompt_0(seeds) -> torch.Tensor:
    return torch.zeros(len(list(seeds)), dtype=torch.long)


# --- the commands, end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ld3", "iia", "ddss"])
def test_learner_runs_on_a_text_to_image_pipeline_and_generate_serves_its_table(method, sd, model, tmp_path, capsys):
    """python -m optimize ld3|iia|ddss model=diffusers model.path=SD model.prompts=[...] model.guidance=3: a table with
    the model's fingerprint, guidance 3, its negative prompt and latent shape; generate --guidance 3 serves it (and
    gives the executor's samples for the prompts of their seeds)."""
    common = ["model=diffusers", f"model.path={sd}", f"model.prompts=[{PROMPTS[0]},{PROMPTS[1]}]", f"model.guidance={W}",
              "nfe=4", f"hydra.run.dir={tmp_path / 'run'}"]
    extra = {
        "ld3": ["n_train=4", "n_valid=2", "rounds_v1=1", "rounds_v2=1", "teacher_nfe=8", "evaluate=false"],
        "iia": ["n_fit=6", "fit_batch_size=4", "substeps=2", "evaluate=false"],
        "ddss": ["loss=match", "family=full", "n_match=6", "batch_size=4", "steps=2", "n_val=4", "val_every=1",
                 "teacher_nfe=8", "data=captioned-digits", "features=[test_t2i_learners:channel_means]",
                 "evaluate_at_end=false", "progress_bar=false"],
    }[method]
    optimize_main([method, *common, *extra])
    capsys.readouterr()
    [path] = sorted((tmp_path / "run").glob(f"{method}-*.safetensors"))
    table = SolverTable.load(str(path), fingerprint=model.fingerprint)
    meta = table.metadata
    assert (meta["guidance"], meta["negative_prompt"], meta["latent_shape"]) == (W, "", [4, 8, 8])
    assert meta["model"] == "diffusers" and table.nfe == 4
    out = tmp_path / "gen"
    code = samplers_cli.main(["generate", "--model", f"diffusers:{sd}", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                              "--guidance", str(W), "--table", str(path), "--n", "3", "--seed", "5", "--out", str(out),
                              "--no-progress"])
    assert code == 0, capsys.readouterr().err
    z = np.load(out / "samples.npz")
    assert json.loads(str(z["metadata"]))["guidance"] == W
    with torch.no_grad():
        seeds = [5, 6, 7]
        ref = model.decode(sample(table, model.denoiser, make_noise(table, model.shape, seeds), model.cond_of(seeds)))
    assert float((torch.from_numpy(z["samples"]) - ref).abs().max()) < 1e-4
    code = samplers_cli.main(["generate", "--model", f"diffusers:{sd}", "--prompt", PROMPTS[0], "--guidance", "7.5",
                              "--table", str(path), "--n", "1", "--out", str(tmp_path / "gen2"), "--no-progress"])
    assert code == 2 and "learned at guidance 3" in capsys.readouterr().err


def test_ddss_starts_from_a_table_learned_at_another_guidance_only_when_asked(sd, model, tmp_path, cli_error, capsys):
    """init=table:PATH with a table learned at guidance 3 on a run at 7.5: refused with the hint that names both scales;
    with model.any_guidance=true it is the start (checked against the model at the table's own scale) and the learned
    table records 7.5."""
    sigma_min, sigma_max = sigma_range(sd)
    start = baselines.build("unipc", 4, sigma_min=sigma_min, sigma_max=sigma_max, schedule="flow")
    meta = {**start.metadata, "model": "diffusers", "model_fingerprint": model.fingerprint, "guidance": W,
            "negative_prompt": "", "latent_shape": [4, 8, 8]}
    path = SolverTable(start.sigmas, start.coef, meta).save(str(tmp_path / "at3.safetensors"))
    common = ["ddss", "model=diffusers", f"model.path={sd}", f"model.prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
              "model.guidance=7.5", "nfe=4", "family=full", f"init=table:{path}", "loss=match", "monitor=match",
              "n_match=4", "batch_size=2", "steps=1", "n_val=2", "val_every=1", "teacher_nfe=4", "evaluate_at_end=false",
              "progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"]
    err = cli_error(common)
    assert "learned at guidance 3" in err and "this run uses 7.5" in err and "model.any_guidance=true" in err
    assert not list((tmp_path / "run").glob("*.safetensors"))
    optimize_main([*common, "model.any_guidance=true"])
    capsys.readouterr()
    [out] = sorted((tmp_path / "run").glob("ddss-*.safetensors"))
    learned = SolverTable.load(str(out))
    assert learned.metadata["guidance"] == 7.5 and learned.metadata["init"] == f"table:{path}"


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_ddss_kid_on_a_text_to_image_model_scores_decoded_samples(sd, model3):
    """loss=kid+match on a latent model: the KID term is the unbiased MMD^2 of the first feature net on the VAE's
    decoded (clipped) samples against the training images (metrics.kid_estimate, computed independently), and its
    gradient reaches the table through the VAE."""
    from omegaconf import OmegaConf

    den, shape = model3.denoiser, model3.shape
    m = Model("sd", den, tuple(shape), "fp", torch.float32, model3.cond_of, model3.decode)
    judge = Judge.for_model(OmegaConf.create({"name": "captioned", "data": "captioned-digits", "clip": True,
                                             "features": ["test_t2i_learners:channel_means"]}), (3, 32, 32), n_boot=0)
    module = ddss.DDSSModule(3, "full", "dpmpp_2m", loss="kid", monitor="fd_train", batch_size=6, n_val=4,
                             sigma_min=den.sigma_min, sigma_max=den.sigma_max).attach(m, judge)
    noise = module.noise(6, 0)
    cond = model3.cond_of(range(6))
    x = module.generate(noise, cond=cond)
    loss = module.loss_of(x)
    with torch.no_grad():
        feats = channel_means()(model3.decode(x.detach()).clamp(-1, 1))
    real = judge.real_feats("train", next(iter(judge.features)))
    assert float(loss.detach()) == pytest.approx(metrics.kid_estimate(feats, real).value, rel=1e-6, abs=1e-10)
    loss.backward()
    assert module.sampler.u.grad is not None and module.sampler.u.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_ddss_kid_against_the_teacher_needs_no_data(sd, model3, cli_error, capsys):
    """kid_against=teacher: the KID reference is the first feature net on the teacher pool's solves, decoded by the
    VAE (no training images: the judge has no real split); the loss is kid_estimate against them, its gradient
    reaches the table; without feature nets, one sentence."""
    from omegaconf import OmegaConf

    den, shape = model3.denoiser, model3.shape
    m = Model("sd", den, tuple(shape), "fp", torch.float32, model3.cond_of, model3.decode)
    judge = Judge.for_model(OmegaConf.create({"name": "sd", "data": None, "clip": True,
                                             "features": ["test_t2i_learners:channel_means"]}), (3, 32, 32), n_boot=0)
    assert "has no reference data" in capsys.readouterr().err
    module = ddss.DDSSModule(3, "full", "dpmpp_2m", loss="kid+match", kid_against="teacher", monitor="match",
                             match_weight=1e-12, n_match=5, batch_size=4, n_val=3, teacher_solver="euler", teacher_nfe=3,
                             sigma_min=den.sigma_min, sigma_max=den.sigma_max).attach(m, judge)
    loss = module.training_step(None, 0)
    e, y, _ = module.match_pool(m)  # the pool again: its solves, decoded, are the reference
    with torch.no_grad():
        real = channel_means()(model3.decode(y).clamp(-1, 1)).double()
    assert torch.allclose(module._ext["real"], real, atol=1e-6)
    loss.backward()
    assert torch.isfinite(loss) and module.sampler.u.grad.abs().sum() > 0
    err = cli_error(["ddss", "model=diffusers", f"model.path={sd}", f"model.prompts=[{PROMPTS[0]}]", "nfe=4",
                     "loss=kid+match", "kid_against=teacher", "monitor=match", "model.features=[]"])
    assert "kid_against=teacher scores the teacher's solves with a feature net" in err
    assert "kid_against must be one of data, teacher" in cli_error(
        ["ddss", "model=gmm", "kid_against=students"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_ddss_feature_match_compares_features_of_the_same_noise(sd, model3, cli_error, capsys):
    """feature_weight > 0: the loss adds feature_weight x the mean squared distance between the first feature net on
    each decoded sample and on the decoded teacher solve from the same pool noise (recomputed here from the pool, the
    step's draw and the VAE), needs no data, and its gradient reaches the table; bad settings get one sentence."""
    from omegaconf import OmegaConf

    den, shape = model3.denoiser, model3.shape
    m = Model("sd", den, tuple(shape), "fp", torch.float32, model3.cond_of, model3.decode)
    judge = Judge.for_model(OmegaConf.create({"name": "sd", "data": None, "clip": True,
                                             "features": ["test_t2i_learners:channel_means"]}), (3, 32, 32), n_boot=0)
    capsys.readouterr()
    module = ddss.DDSSModule(3, "full", "dpmpp_2m", loss="match", monitor="match", match_weight=1e-12, feature_weight=2.0,
                             n_match=6, batch_size=4, n_val=3, teacher_solver="euler", teacher_nfe=3,
                             sigma_min=den.sigma_min, sigma_max=den.sigma_max).attach(m, judge)
    loss = module.training_step(None, 0)
    e, y, c = module.match_pool(m)
    idx = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:4]  # the draw of step 0 at seed 0, rank 0
    noise = module.noise(4, 0)
    noise[0] = e[idx]
    with torch.no_grad():
        x = module.generate(noise, remat=False, cond=cond_rows(c, idx))
        fx = channel_means()(model3.decode(x).clamp(-1, 1)).double()
        fy = channel_means()(model3.decode(y[idx]).clamp(-1, 1)).double()
    expected = 2.0 * (fx - fy).pow(2).mean(1).mean()
    other = 2.0 * (fx - fy.roll(1, 0)).pow(2).mean(1).mean()  # the same features paired with another seed's solve
    assert float(expected) > 0 and abs(float(other) / float(expected) - 1) > 0.05
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-3)  # float32 decodes in other batches
    loss.backward()
    assert module.sampler.u.grad.abs().sum() > 0
    common = ["ddss", "model=diffusers", f"model.path={sd}", f"model.prompts=[{PROMPTS[0]}]", "nfe=4", "monitor=match"]
    assert "feature_weight adds a feature term to the teacher match: it needs loss=match or kid+match" in cli_error(
        [*common, "loss=kid", "kid_against=teacher", "feature_weight=1",
         "model.features=[checkpoints/features-captioned-a.safetensors]"])
    assert "feature_weight compares the first feature net's features" in cli_error(
        [*common, "loss=match", "feature_weight=1", "model.features=[]"])
    assert "feature_weight must be" in cli_error([*common, "loss=match", "feature_weight=-1"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_ddss_kid_against_the_teacher_still_selects_on_the_training_set(sd, model3):
    """kid_against=teacher with monitor=fd_train (data given): the KID reference is the teacher pool's features, while
    validation scores FD against the training images on the first net (its split is kept)."""
    from omegaconf import OmegaConf

    den, shape = model3.denoiser, model3.shape
    m = Model("sd", den, tuple(shape), "fp", torch.float32, model3.cond_of, model3.decode)
    judge = Judge.for_model(OmegaConf.create({"name": "captioned", "data": "captioned-digits", "clip": True,
                                             "features": ["test_t2i_learners:channel_means"]}), (3, 32, 32), n_boot=0)
    module = ddss.DDSSModule(3, "full", "dpmpp_2m", loss="kid+match", kid_against="teacher", monitor="fd_train",
                             n_match=5, batch_size=4, n_val=3, teacher_solver="euler", teacher_nfe=3,
                             sigma_min=den.sigma_min, sigma_max=den.sigma_max).attach(m, judge)
    module.training_step(None, 0)
    _, y, _ = module.match_pool(m)
    with torch.no_grad():
        teacher = channel_means()(model3.decode(y).clamp(-1, 1)).double()
    assert torch.allclose(module._ext["real"].double(), teacher, atol=1e-6)
    scores = module.validate_now(log=False)  # (before: the teacher-only judge had no training split, a KeyError)
    assert math.isfinite(scores[f"fd_train_{module._ext['feature']}"]) and int(module.best_step) == 0


# --- the cond follows the noise --------------------------------------------------------------------
def test_teacher_targets_are_solved_with_the_prompt_of_each_seed(sd, model):
    """LD3's targets (and teacher_targets in batches of 3) for seed s equal a solve of that noise alone with prompt
    s mod P; with the prompts swapped, every target becomes the solve with the other prompt."""
    swapped = load(f"diffusers:{sd}", prompts=PROMPTS[::-1], guidance=W)
    den, shape = model.denoiser, model.shape
    lo, hi = den.sigma_min, den.sigma_max
    seeds = seed_range(FIT_SEED_OFFSET, 0, 5)
    e = make_noise(1, shape, seeds)[0]
    teacher = baselines.build("euler", 4, sigma_min=lo, sigma_max=hi, end="sigma_min")
    with torch.no_grad():  # each noise alone, with each prompt: [seed, prompt, *shape]
        alone = torch.stack([torch.stack([sample(teacher, den, e[i:i + 1][None], torch.tensor([p]))[0] for p in (0, 1)])
                             for i in range(len(seeds))])
    own = alone[torch.arange(len(seeds)), torch.tensor(seeds) % 2]
    other = alone[torch.arange(len(seeds)), (torch.tensor(seeds) + 1) % 2]
    assert float((own - other).abs().max()) > 1e-2  # the prompt matters: the checks below can fail

    def close(a, b) -> bool:
        return float((a - b).abs().max()) < 1e-4 * float(b.abs().max())

    _, fitter = ld3.fit(den, shape, "unipc", 2, n_train=3, n_valid=2, teacher_solver="euler", teacher_nfe=4,
                        sigma_min=lo, sigma_max=hi, rounds_v1=0, rounds_v2=0, cond_of=model.cond_of)
    targets = torch.cat([fitter.data["train"]["target"], fitter.data["valid"]["target"]])
    assert close(targets, own)
    assert torch.equal(torch.cat([fitter.data["train"]["cond"], fitter.data["valid"]["cond"]]), torch.tensor(seeds) % 2)
    _, fitter = ld3.fit(swapped.denoiser, shape, "unipc", 2, n_train=3, n_valid=2, teacher_solver="euler",
                        teacher_nfe=4, sigma_min=lo, sigma_max=hi, rounds_v1=0, rounds_v2=0, cond_of=swapped.cond_of)
    assert close(torch.cat([fitter.data["train"]["target"], fitter.data["valid"]["target"]]), other)
    split = teacher_targets(den, e, "euler", 4, lo, hi, batch_size=3, cond=model.cond_of(seeds))
    assert close(split, own)


def test_ld3_gives_every_row_its_seeds_prompt_through_split_batches_and_moves(model, model3):
    """Every LD3 call from pure noise (teacher, train batches of 2 in shuffled order, soft-teacher moves, validation)
    gets the prompt of the seed that noise came from; a 2-prompt fit differs from one where every row got prompt 0."""
    den, shape = model3.denoiser, model3.shape
    seeds = seed_range(FIT_SEED_OFFSET, 0, 6)
    rec = Recorder(den, noises_of(seeds, shape), den.sigma_max)
    kw = dict(n_train=4, n_valid=2, teacher_solver="euler", teacher_nfe=4, sigma_min=den.sigma_min,
              sigma_max=den.sigma_max, rounds_v1=1, rounds_v2=1)
    _, fitter = ld3.fit(rec, shape, "unipc", 3, cond_of=model3.cond_of, **kw)
    rec.check()
    assert fitter.iterations > 0 and len(rec.seen) > 30
    moved = fitter.data["train"]["cur"] - fitter.data["train"]["orig"]
    assert float(moved.abs().max()) > 0  # the soft teacher moved some noises (and their prompts stayed with them)
    table, _ = ld3.fit(model.denoiser, shape, "unipc", 3, cond_of=model.cond_of, **kw)
    zero, _ = ld3.fit(model.denoiser, shape, "unipc", 3, cond_of=all_prompt_0, **kw)
    assert not torch.equal(table.sigmas, zero.sigmas)


def test_iia_gives_every_row_its_seeds_prompt(model, model3):
    """IIA's fitting batches (fine trajectory, every row's continuation, the step targets): each row its seed's prompt;
    a 2-prompt fit differs from one where every row got prompt 0."""
    den, shape = model3.denoiser, model3.shape
    seeds = list(range(FIT_SEED_OFFSET, FIT_SEED_OFFSET + 5))
    base = baselines.build("euler", 3, sigma_min=den.sigma_min, sigma_max=den.sigma_max)
    kw = dict(n_fit=5, seed=FIT_SEED_OFFSET, substeps=2, batch_size=3, variant="generic")
    for target in ("trajectory", "step"):
        rec = Recorder(den, noises_of(seeds, shape), den.sigma_max)
        iia.fit(rec, base, shape, target=target, cond_of=model3.cond_of, **kw)
        rec.check()
        assert sorted({s for s, _ in rec.seen}) == seeds
    fitted = iia.fit(model.denoiser, base, shape, target="step", cond_of=model.cond_of, **kw)
    zero = iia.fit(model.denoiser, base, shape, target="step", cond_of=all_prompt_0, **kw)
    assert not torch.equal(fitted.coef, zero.coef)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_ddss_match_gives_every_row_its_seeds_prompt(model3):
    """DDSS loss=match: the teacher pool, the training batches drawn from it and the validation set each give a row
    its seed's prompt (validation decodes before the judge)."""
    model = model3
    den, shape = model.denoiser, model.shape
    pool = seed_range(FIT_SEED_OFFSET, 0, 6)
    val = seed_range(VAL_SEED_OFFSET, 0, 4)
    rec = Recorder(den, {**noises_of(pool, shape), **noises_of(val, shape)}, den.sigma_max)
    m = Model("sd", rec, tuple(shape), "fp", torch.float32, model.cond_of, model.decode)
    real = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    judge = Judge(features={"main": channel_means()}, real={"train": real}, n_boot=0)
    module = ddss.DDSSModule(3, "full", loss="match", n_match=6, batch_size=4, n_val=4, teacher_solver="euler",
                             teacher_nfe=4, sigma_min=den.sigma_min, sigma_max=den.sigma_max).attach(m, judge)
    module.validate_now(log=False)
    loss = module.training_step(None, 0)
    loss.backward()
    rec.check()
    assert {s for s, _ in rec.seen} == set(pool) | set(val)
    assert module.history["val"][0]["fd_train_main"] >= 0  # scored on decoded 3x32x32 images against the real ones


def test_ddss_learns_from_prompts_alone_and_keeps_the_table_nearest_the_teacher(sd, model, tmp_path, capsys):
    """loss=match monitor=match needs no data and no feature nets: validation is the mean squared distance to the
    teacher's solve on the validation seeds (each with its prompt), and the exported table is the best validated one."""
    optimize_main(["ddss", "model=diffusers", f"model.path={sd}", f"model.prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
                   f"model.guidance={W}", "nfe=3", f"hydra.run.dir={tmp_path / 'run'}", "loss=match", "monitor=match",
                   "family=full", "init=dpmpp_2m", "n_match=6", "batch_size=4", "steps=3", "n_val=4", "val_every=1",
                   "teacher_nfe=8", "evaluate_at_end=false", "progress_bar=false"])
    capsys.readouterr()
    [path] = sorted((tmp_path / "run").glob("ddss-*.safetensors"))
    table = SolverTable.load(str(path), fingerprint=model.fingerprint)
    meta, cfg = table.metadata, table.metadata["run_config"]
    assert meta["objective"] == "match" and len(meta["validation"]) == 4  # before step 1, then after steps 1..3
    seeds = list(range(VAL_SEED_OFFSET, VAL_SEED_OFFSET + 4))
    e = make_noise(1, model.shape, seeds)[0]
    with torch.no_grad():  # the monitor, recomputed independently for the exported table
        target = teacher_targets(model.denoiser, e, "unipc", 8, float(cfg["sigma_min"]), float(cfg["sigma_max"]),
                                 cond=model.cond_of(seeds))
        x = sample(table, model.denoiser, make_noise(table, model.shape, seeds), model.cond_of(seeds))
    score = float((x - target).double().pow(2).flatten(1).mean(1).mean())
    best = min(v["match"] for v in meta["validation"])
    assert meta["selection_metrics"]["match"] == best and score == pytest.approx(best, rel=1e-4)
    with pytest.raises(SystemExit):
        optimize_main(["ddss", "model=gmm", "nfe=3", "loss=kid", "monitor=match", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert "monitor=match selects by the teacher match" in capsys.readouterr().err


def test_ddp_processes_share_out_the_teacher_pool_by_seed(model3):
    """Under DDP process r of N solves the pool seeds i = r mod N with their prompts: the shares partition the
    single-process pool row for row (noise, teacher solve, prompt)."""
    module = ddss.DDSSModule(3, "full", loss="match", n_match=5, batch_size=2, n_val=4, teacher_solver="euler",
                             teacher_nfe=3, sigma_min=model3.denoiser.sigma_min, sigma_max=model3.denoiser.sigma_max)
    m = Model("sd", model3.denoiser, tuple(model3.shape), "fp", torch.float32, model3.cond_of, model3.decode)
    e, y, c = module.match_pool(m)
    shares = [module.match_pool(m, r, 2) for r in range(2)]
    assert [len(s[0]) for s in shares] == [3, 2]
    for r, (e_r, y_r, c_r) in enumerate(shares):
        assert torch.equal(e_r, e[r::2]) and torch.equal(c_r, c[r::2])
        assert torch.allclose(y_r, y[r::2], atol=1e-5)


@pytest.mark.slow
def test_ddss_on_a_text_to_image_pipeline_under_two_process_ddp(sd, model, tmp_path):
    """devices=2 strategy=ddp (gloo on CPU): two processes, each on its share of the seeds and prompts, write one table
    that records the world size and serves the model."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "optimize", "ddss", "model=diffusers", f"model.path={sd}",
                           f"model.prompts=[{PROMPTS[0]},{PROMPTS[1]}]", f"model.guidance={W}", "nfe=3", "loss=match",
                           "monitor=match", "family=full", "init=dpmpp_2m", "n_match=8", "batch_size=4", "steps=2", "n_val=4",
                           "val_every=1", "teacher_nfe=6", "evaluate_at_end=false", "progress_bar=false", "accelerator=cpu",
                           "devices=2", "strategy=ddp", f"hydra.run.dir={run}"], cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = sorted(run.glob("ddss-*.safetensors"))
    table = SolverTable.load(str(path), fingerprint=model.fingerprint)
    assert table.metadata["world_size"] == 2 and table.metadata["steps"] == 2


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_ddss_match_in_decoded_space_backpropagates_through_the_vae(model3):
    """match_space=decoded: the pool and validation targets are the teacher's solves decoded by the VAE, the training
    loss is the squared distance of the decoded samples to them (gradient through the VAE into the table), and the
    monitor equals that distance recomputed from samplers.sample and the pipeline's decode."""
    den, shape = model3.denoiser, model3.shape
    m = Model("sd", den, tuple(shape), "fp", torch.float32, model3.cond_of, model3.decode)
    kw = dict(loss="match", monitor="match", n_match=4, batch_size=4, n_val=3, teacher_solver="euler", teacher_nfe=3,
              sigma_min=den.sigma_min, sigma_max=den.sigma_max, match_weight=1.0)
    module = ddss.DDSSModule(3, "full", "dpmpp_2m", match_space="decoded", **kw).attach(m, None)
    scores = module.validate_now(log=False)
    seeds = seed_range(VAL_SEED_OFFSET, 0, 3)
    e = make_noise(1, shape, seeds)[0]
    with torch.no_grad():
        target = model3.decode(teacher_targets(den, e, "euler", 3, den.sigma_min, den.sigma_max, cond=model3.cond_of(seeds)))
        table = module.sampler.frozen()
        x = model3.decode(sample(table, den, make_noise(table, shape, seeds), model3.cond_of(seeds)))
    assert x.shape[1:] == (3, 32, 32)
    assert scores["match"] == pytest.approx(float((x - target).double().pow(2).flatten(1).mean(1).mean()), rel=1e-4)
    loss = module.training_step(None, 0)
    loss.backward()
    assert torch.isfinite(loss) and module.sampler.u.grad is not None and module.sampler.u.grad.abs().sum() > 0
    latent = ddss.DDSSModule(3, "full", "dpmpp_2m", **kw).attach(m, None).validate_now(log=False)
    assert latent["match"] != pytest.approx(scores["match"], rel=1e-3)  # the latent monitor is another distance


def test_match_space_decoded_needs_a_latent_model(cli_error):
    assert "match_space=decoded compares images decoded by a VAE" in cli_error(
        ["ddss", "model=gmm", "loss=match", "monitor=match", "family=full", "match_space=decoded"])

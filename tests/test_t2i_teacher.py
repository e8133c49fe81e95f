"""The tiny text-to-image teachers (optimize.methods.t2i_teacher, checkpoints/sd-tiny and checkpoints/sd3-tiny): the
shipped folders load in the stock pipelines and as the project's models, their tokenizer keeps every caption word
one token, the trainer encodes prompts exactly as the pipelines do (and its fast SD3 attention equals the stock one on
the pipeline's 256 zero tokens), a tiny run of every stage trains, exports loadable folders and resumes bit for bit,
and bad configuration values are one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from optimize.cli import main  # noqa: E402
from optimize.data.captioned import parse_caption  # noqa: E402
from optimize.data.tokenizer import caption_words, clip_bpe, clip_tokenizer  # noqa: E402
from optimize.methods import t2i_teacher as T  # noqa: E402
from samplers.models import load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"sd": ROOT / "checkpoints" / "sd-tiny", "sd3": ROOT / "checkpoints" / "sd3-tiny"}
PROMPTS = ["a red seven on a gravel background", "a white zero on a black background", ""]


@pytest.fixture(scope="module")
def pipes() -> dict[str, object]:
    kw = dict(use_safetensors=True, local_files_only=True)
    return {"sd": StableDiffusionPipeline.from_pretrained(str(SHIPPED["sd"]), **kw),
            "sd3": StableDiffusion3Pipeline.from_pretrained(str(SHIPPED["sd3"]), **kw)}


def test_shipped_folders_are_the_stock_pipelines_with_sds_schedule(pipes) -> None:
    sd, sd3 = pipes["sd"], pipes["sd3"]
    cfg = sd.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, cfg.prediction_type) == \
        ("scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    assert sd.safety_checker is None and not sd.config.requires_safety_checker
    assert sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size
    assert len(sd.vae.config.block_out_channels) == 3 and sd.unet.config.sample_size == 8  # 32x32 <-> 8x8
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sd3.scheduler.config.shift > 0
    # the same VAE in both folders, its scaling factor 1/std of the training latents (recorded beside it)
    a, b = (load_file(str(SHIPPED[k] / "vae" / "diffusion_pytorch_model.safetensors")) for k in ("sd", "sd3"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sd.vae.config.scaling_factor == sd3.vae.config.scaling_factor and sd3.vae.config.shift_factor == 0.0
    for k in SHIPPED:
        info = json.loads((SHIPPED[k] / "training.json").read_text())
        assert info["stage"] == k and info["data"].endswith("images='train', prompts='train')")


def test_shipped_folders_load_as_project_models() -> None:
    for kind, folder in SHIPPED.items():
        model = load(f"diffusers:{folder}", prompts=PROMPTS[:2], guidance=7.5)
        den = model.denoiser
        x = torch.randn(2, *den.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            d = den(x, torch.tensor([3.0, 3.0]), torch.tensor([0, 1]))
        assert d.shape == x.shape and torch.isfinite(d).all(), kind
        assert den.decode(d).shape == (2, 3, 32, 32)


def test_tokenizer_keeps_every_caption_word_one_token(pipes, tmp_path) -> None:
    words = caption_words()
    assert {w for c in T.training_prompts() for w in c.split()} <= set(words)
    assert all(parse_caption(c) for c in T.training_prompts())
    fresh = clip_tokenizer(tmp_path / "tok", words, 16)
    for tok in (pipes["sd"].tokenizer, pipes["sd3"].tokenizer, pipes["sd3"].tokenizer_2,
                CLIPTokenizer.from_pretrained(str(SHIPPED["sd"] / "tokenizer")), fresh):
        for w in words:
            ids = tok(w).input_ids
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 3, (w, ids)
            assert tok.convert_ids_to_tokens(ids[1]) == w + "</w>" and tok.decode(ids[1:2]) == w
        assert tok.get_vocab() == fresh.get_vocab()
    vocab, merges = clip_bpe(["on", "one"])
    assert "on</w>" in vocab and "one</w>" in vocab and len(merges) == len(set(merges))
    with pytest.raises(ValueError, match="lower-case ASCII words"):
        clip_bpe(["Red"])


def test_trainer_encodes_prompts_as_the_pipelines_do(pipes) -> None:
    sd, sd3 = pipes["sd"], pipes["sd3"]
    ids = T.token_ids(sd.tokenizer, PROMPTS)
    with torch.no_grad():
        ref, _ = sd.encode_prompt(PROMPTS, "cpu", 1, False)
        assert torch.equal(T.sd_encode(sd.text_encoder, ids), ref)
        emb, _, pooled, _ = sd3.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False)
        dim = sd3.transformer.config.joint_attention_dim
        mine, mine_pooled = T.sd3_encode((sd3.text_encoder, sd3.text_encoder_2), ids, dim)
    assert emb.shape[1] == 16 + T.T5_TOKENS and torch.equal(mine, emb) and torch.equal(mine_pooled, pooled)
    assert not emb[:, 16:].any()  # the T5 slot gives exact zeros, as text_encoder_3=None would


def test_repeated_token_attention_equals_the_stock_transformer(pipes) -> None:
    """Training runs the transformer on one zero token weighted log(256); the stock joint attention on the pipeline's
    256 zero tokens gives the same output to float32 rounding."""
    sd3 = pipes["sd3"]
    ids = T.token_ids(sd3.tokenizer, PROMPTS)
    net = sd3.transformer
    dim = net.config.joint_attention_dim
    x = torch.randn(3, *[net.config.in_channels, 8, 8], generator=torch.Generator().manual_seed(1))
    t = torch.tensor([20.0, 500.0, 990.0])
    with torch.no_grad():
        full, pooled = T.sd3_encode((sd3.text_encoder, sd3.text_encoder_2), ids, dim)
        ref = net(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
        short, _ = T.sd3_encode((sd3.text_encoder, sd3.text_encoder_2), ids, dim, t5_tokens=1)
        stock = dict(net.attn_processors)
        try:
            net.set_attn_processor(T.RepeatedLastToken(T.T5_TOKENS))
            fast = net(hidden_states=x, timestep=t, encoder_hidden_states=short, pooled_projections=pooled).sample
        finally:
            net.set_attn_processor(stock)
    assert float((fast - ref).abs().max()) < 1e-5 * float(ref.abs().max()) + 1e-6


def test_losses_match_their_definitions() -> None:
    abar = T.sd_alphas_cumprod()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(abar, torch.cumprod(1 - betas, 0)) and abs(float(abar[-1]) - 0.00466) < 1e-4
    z0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    seen = {}

    def unet(xt, tt, encoder_hidden_states, return_dict):
        seen["xt"] = xt
        return (xt * 0.5,)

    loss = T.epsilon_loss(unet, z0, None, t, noise, abar)
    a = abar[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(seen["xt"], a.sqrt() * z0 + (1 - a).sqrt() * noise)
    assert torch.allclose(loss, ((noise - seen["xt"] * 0.5) ** 2).mean())
    s = torch.tensor([0.1, 0.5, 0.9, 0.99])

    def transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        seen["flow"] = (hidden_states, timestep)
        return (torch.zeros_like(hidden_states),)

    loss = T.flow_loss(transformer, z0, None, None, s, noise)
    assert torch.allclose(seen["flow"][0], (1 - s.reshape(-1, 1, 1, 1)) * z0 + s.reshape(-1, 1, 1, 1) * noise)
    assert torch.allclose(seen["flow"][1], s * 1000) and torch.allclose(loss, ((noise - z0) ** 2).mean())
    gen = torch.Generator().manual_seed(0)
    dropped = T.drop_captions(torch.zeros(20_000, dtype=torch.long), 0.1, 7, gen)
    assert set(dropped.tolist()) == {0, 7} and abs(float((dropped == 7).double().mean()) - 0.1) < 0.01


TINY = ["t2i_teacher", "n_data=48", "batch_size=8", "warmup_steps=1", "vae_channels=[8,8,8]", "text_width=16",
        "text_heads=2", "unet_channels=[16,16]", "transformer_width=32", "transformer_layers=1", "checkpoint_every=2"]


def test_tiny_training_runs_every_stage_exports_and_resumes(tmp_path: Path) -> None:
    vae = tmp_path / "vae"
    main([*TINY, "stage=vae", "steps=2", f"hydra.run.dir={tmp_path / 'v'}", f"export_dir={vae}"])
    cfg = json.loads((vae / "config.json").read_text())
    assert cfg["latent_channels"] == 4 and cfg["scaling_factor"] > 0 and cfg["shift_factor"] == 0.0
    common = [*TINY, f"vae={vae}"]
    main([*common, "stage=sd", "steps=4", f"hydra.run.dir={tmp_path / 'a'}"])
    main([*common, "stage=sd", "steps=2", f"hydra.run.dir={tmp_path / 'b'}"])
    main([*common, "stage=sd", "steps=4", f"hydra.run.dir={tmp_path / 'b'}", f"resume={tmp_path / 'b'}"])
    for part in ("unet", "text_encoder"):
        name = "diffusion_pytorch_model.safetensors" if part == "unet" else "model.safetensors"
        a, b = (load_file(str(tmp_path / r / "sd" / part / name)) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    main([*common, "stage=sd3", "steps=2", f"hydra.run.dir={tmp_path / 'c'}", "shift=3.0"])
    kw = dict(use_safetensors=True, local_files_only=True)
    sd = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a" / "sd"), **kw)
    sd3 = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "c" / "sd3"), **kw)
    assert sd3.scheduler.config.shift == 3.0 and sd.vae.config.scaling_factor == cfg["scaling_factor"]
    out = sd3("a red seven on a gravel background", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
              generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    info = json.loads((tmp_path / "b" / "sd" / "training.json").read_text())
    assert info["steps"] == 4 and info["stage"] == "sd"


@pytest.mark.parametrize("args, message", [
    (["stage=unet"], "stage must be one of vae, sd, sd3, got 'unet'"),
    (["caption_dropout=1.5"], "caption_dropout must lie in [0, 1], got 1.5"),
    (["unet_channels=[64]"], "unet_channels must be a list of 2 to 4 integers"),
    (["transformer_width=100"], "transformer_width must be a multiple of 32"),
    (["stage=sd3", "patch_size=3"], "patch_size must divide the 8x8 latents"),
    (["stage=sd", "vae=/nonexistent/vae"], "vae=/nonexistent/vae is not an AutoencoderKL folder"),
    (["steps=0"], "steps must be a positive integer"),
])
def test_bad_config_is_one_error_line(args: list[str], message: str, cli_error) -> None:
    vae = [] if any(a.startswith("vae=") for a in args) else [f"vae={SHIPPED['sd'] / 'vae'}"]
    assert message in cli_error(["t2i_teacher", *vae, *args])

"""Bring your own model: `python -m optimize iia model=callable model.target=examples.byo_model:digits nfe=5`.

The target returns (denoiser, sample shape). The denoiser is D(x, sigma, cond=None) -> x0 estimate in EDM
sigma-space (x = x0 + sigma * noise), for x [B, *shape] and sigma [B]: wrap any network (k-diffusion style)."""
import torch

from pathlib import Path

from samplers.nets import load_net  # here: the raw U-Net of the shipped digits teacher (any torch net will do)


class KarrasDenoiser(torch.nn.Module):
    """EDM preconditioning (Karras et al. 2022) around a raw net F(c_in x, c_noise)."""

    def __init__(self, net: torch.nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.sd = net, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        s = sigma.reshape(-1, *[1] * (x.ndim - 1))
        c_skip, c_out = self.sd**2 / (s**2 + self.sd**2), s * self.sd / (s**2 + self.sd**2).sqrt()
        return c_skip * x + c_out * self.net(x / (s**2 + self.sd**2).sqrt(), sigma.log() / 4)


def digits(checkpoint: str = str(Path(__file__).parents[1] / "checkpoints/edm-digits.safetensors")):
    net, config = load_net(checkpoint)
    return KarrasDenoiser(net.eval(), float(config.get("sigma_data", 0.5))), (1, 8, 8)


def features():
    """A feature map for features=[examples.byo_model:features] (here: the shipped digits classifier's features)."""
    from optimize.evaluation.classifier import load_classifier

    return load_classifier(str(Path(__file__).parents[1] / "checkpoints/classifier-digits.safetensors")).features

"""DDPM forward noising (Ho et al. 2020) with the SD1.5 "scaled linear" schedule, for the diffusion loss."""
from __future__ import annotations

import torch

__all__ = ["TRAIN_TIMESTEPS", "sd15_alphas_cumprod", "ddpm_noise", "alphas_cumprod_from_sigmas"]

TRAIN_TIMESTEPS = 1000


def sd15_alphas_cumprod(steps: int = TRAIN_TIMESTEPS, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t (steps,) float64 of the scaled-linear schedule SD1.5 was trained with (betas linear in sqrt space)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t from k-diffusion sigmas σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), i.e. ᾱ_t = 1 / (1 + σ_t²)."""
    return 1.0 / (1.0 + sigmas.double() ** 2)


def ddpm_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) · x0 + sqrt(1 - ᾱ_t) · ε, with one timestep per batch item. x0, noise: (N, C, H, W); t: (N,)."""
    abar = alphas_cumprod.to(x0.device)[t.to(x0.device)].view(-1, *([1] * (x0.dim() - 1)))
    return (abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise).to(x0.dtype)

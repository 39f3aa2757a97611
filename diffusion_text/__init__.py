"""diffusion_text: continuous-latent text diffusion in JAX."""

__version__ = "0.1.0"

"""Stage 3: conditional latent diffusion - latent cache, training, transitions, real-to-generated."""

"""Stage 1: the histology autoencoder (diffusers AutoencoderKL), its training and its command-line tool."""

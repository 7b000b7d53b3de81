"""`python -m autoencoder encode|decode|reconstruct|evaluate ...` (same as `mitosis-ldm vae ...`)."""

from .cli import main

if __name__ == "__main__":
    main()

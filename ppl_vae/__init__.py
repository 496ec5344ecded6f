"""ppl_vae: variational autoencoders as Pyro programs, trained fast and evaluated honestly."""
__version__ = "0.1.0"

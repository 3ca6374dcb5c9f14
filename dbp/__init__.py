"""dbp: diffusion-based purification and ADDT. Every formula of the system lives here once."""
__version__ = "0.1.0"

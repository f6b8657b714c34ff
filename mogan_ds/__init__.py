"""mogan_ds: MoGAN motion post-training of few-step Wan2.1 video diffusion models on DeepSpeed."""

__version__ = "0.1.0"

"""mogan_ds: MoGAN motion post-training of few-step Wan2.1 video diffusion models on DeepSpeed."""

import logging

__version__ = "0.1.0"

# diffusers imports bitsandbytes when it is installed (pyiqa, an evaluation extra, brings it),
# and bitsandbytes' CPU backend then warns on stderr about an optional 4-bit kernel package on
# every start. Nothing here quantises with it, so only its errors are shown.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

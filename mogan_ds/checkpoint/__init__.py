"""Checkpoints and what is made of them: the per-step manager, the fp32 master weights, the EMA's
consolidation, resharding onto another dp x sp layout and the diffusers export."""

"""The flow-matching schedule and what samples with it: few-step samplers, batch generation from a
release, and the sample videos a training run writes."""

"""The toy experiment's seven stages, one module each; each `run(exp, recipe)` works in the
experiment's work folder and returns the stage's report (pipeline.Experiment sequences them)."""

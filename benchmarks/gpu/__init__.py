"""The parts of benchmarks/gpu_check.py, the one prepared command for a GPU machine.

gpu_check.py (the entry point, run by path) parses the arguments and runs each part as a subprocess
of itself; the parts and what they share live here:

  common.py        Mode (H200 vs CPU smoke), Report (a part's JSON), json / log-tail / process-group helpers
  plans.py         the planner's figures c compares against: PLAN_SPECS, gpu_check_plans.json, its fingerprint
  env.py           part a: versions, tools, the attention backend, the matmul ceiling
  dit.py           part d: the DiT alone, per attention backend
  launcher_run.py  the real launcher (launch, metrics rows, trainer facts, out-of-memory phase) and
                   part b: FusedAdam's background build, the tiny run and its resume
  paper_inputs.py  full-size random networks and prompt embeddings, written through the real save path
  paper.py         part c: the paper's iteration, compared with the planner
"""

"""`python -m mogan_ds plan`: one rank of a MoGAN iteration run on fake tensors at the recipe's shape.

flops.py     the CPU flash-SDPA FLOP formula; FlopCounterMode counting (the tests' reference)
memory.py    live-bytes tracking on fake tensors; ZeRO model states per engine
trace.py     one dispatch mode for FLOPs by network and live bytes (the planner's pass)
memo.py      identical DiT blocks measured once and replayed
hardware.py  GPU table (peak bf16, memory) and the iteration-time estimate
comm.py      local stand-ins for the sequence-parallel collectives (bytes counted), ZeRO-3 traffic
runner.py    networks on the meta device -> fake tensors, the trainer's phases for one rank
report.py    the table, the fit verdict and suggestions, the JSON line
"""

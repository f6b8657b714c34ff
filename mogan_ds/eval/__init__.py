"""VBench-exact evaluation of generated videos: the paper's Table 1 columns.

Each metric module follows one VBench (v0.1.5) function, named in its docstring:
`dynamic_degree` (RAFT), `motion_smoothness` (AMT-S frame interpolation), `quality`
(LAION aesthetic predictor on CLIP ViT-L/14, MUSIQ). `runner` samples generators and
writes the results table; `weights` names the files behind every number.
"""

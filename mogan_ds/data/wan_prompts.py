"""Wan's standard prompt texts, in a module without imports so the config tree can use them.

`WAN_NEGATIVE_PROMPT` is Wan2.1's CFG negative prompt (``sample_neg_prompt`` of the
official repository's ``wan/configs/shared_config.py``; the public Wan DMD recipes use
it too). It names static, motionless frames (静态, 静止, 静止不动的画面) among what to steer
away from, which matters for a motion paper. The recipes' ``text.negative_prompt`` and
``data_tools/encode_prompts.py --negative-prompt`` default to it; the empty prompt
(diffusers' WanPipeline default) is an option of both.
"""

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

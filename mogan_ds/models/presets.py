"""Architecture presets: the network configs of known model families.

A run loads weights from folders; these presets describe the architectures *without*
weights so a job can be planned (parameter counts, memory) before the weights are on
disk (`python -m mogan_ds info`). When the folder exists its own config.json wins.
"""

from __future__ import annotations

from . import tiny

# Wan2.1-T2V-1.3B-Diffusers: transformer/config.json, vae/config.json (AutoencoderKLWan
# defaults), text_encoder/config.json (umt5-xxl encoder).
WAN21_T2V_1_3B = {
    "transformer": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ),
    "vae": {},
    "text_encoder": dict(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    ),
    "raft_arch": "raft_large",
}

TINY = {
    "transformer": tiny.TINY_TRANSFORMER,
    "vae": tiny.TINY_VAE,
    "text_encoder": tiny.TINY_TEXT_ENCODER,
    "raft_arch": tiny.RAFT_ARCH,
}

PRESETS = {"wan2.1-t2v-1.3b": WAN21_T2V_1_3B, "tiny": TINY}

"""The named presets (``--preset``): the layer of the config between the defaults and a TOML file.

Plain data, kept apart from :mod:`lmkit.core.config` so that ``lmkit presets`` answers without
importing torch.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "description": "2 layers, d=64: for tests and smoke runs (seconds on a CPU)",
        "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2,
                  "cond_dim": 16},
        "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"seq_len": 64, "batch_tokens": 1024, "steps": 40, "log_every": 5,
                  "val_tokens": 4096, "warmup_steps": 5, "ckpt_seconds": 5.0},
    },
    "small": {
        "description": "4 layers, d=256, seq 256: a CPU demo that learns real text in minutes",
        "model": {"n_layer": 4, "d_model": 256, "n_head": 4, "n_kv_head": 2,
                  "cond_dim": 64},
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        # 8 sequences per micro-batch (4 per step): on the 2-core CPU this preset is sized for,
        # 1.2x faster than the whole step at once and half the peak memory (activations stay
        # in cache); evaluation batches follow the micro-batch. Compiled blocks: 1.09x (ar) and
        # 1.22x (mdlm) faster steps for ~25 s of compiling, done in one untimed primed step.
        "train": {"seq_len": 256, "batch_tokens": 8192, "micro_batch": 8, "steps": 400,
                  "log_every": 10, "val_every": 100, "val_tokens": 32768, "warmup_steps": 20,
                  "compile": True, "prime_steps": 1},
    },
    "pg-baseline": {
        "description": "the parameter-golf baseline: 9 layers, d=512, GQA 8/4, Muon, seq 1024, "
                       "524,288 tokens/step (17,059,912 parameters)",
        "model": {},
        "optim": {"name": "muon"},
        "data": {"group_size": 8},
        "train": {"seq_len": 1024, "batch_tokens": 524288, "micro_batch": 64, "steps": 20000,
                  "warmup_steps": 0, "warmdown_frac": 0.06, "log_every": 50, "val_every": 1000,
                  "val_tokens": 1048576, "ckpt_every": 1000},
    },
    "pg-mdlm": {
        "description": "the parameter-golf MDLM trunk (#1106/#1241): 11 layers, d=512, 8 heads, "
                       "MLP 3x, AdaLN on sigma, untied head (32,987,776 parameters), AdamW 6e-4",
        "model": {"n_layer": 11, "n_kv_head": 8, "mlp_mult": 3.0, "q_gain_init": 0.0,
                  "unet_skips": False, "x0_mix": False, "block_scales": False,
                  "tie_embeddings": False, "logit_softcap": 0.0, "cond_dim": 128},
        "optim": {"name": "adamw", "lr": 6e-4, "weight_decay": 0.1, "grad_clip": 1.0},
        "data": {"group_size": 8},
        "train": {"seq_len": 2048, "batch_tokens": 65536, "steps": 6000, "warmup_steps": 300,
                  "warmdown_frac": 0.25, "log_every": 50, "val_every": 1000,
                  "val_tokens": 262144, "ckpt_every": 1000},
    },
}

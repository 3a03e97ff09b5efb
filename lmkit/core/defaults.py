"""Numbers that core uses and the CLI shows in ``--help``, kept where importing them costs
nothing (``lmkit --help`` must not import torch)."""

DEFAULT_CAP_BYTES = 16_000_000  # decimal bytes, as parameter-golf counts them (not 16 MiB)
DEFAULT_CALIB_TOKENS = 65_536  # training tokens for GPTQ's Hessians
DEFAULT_NUM_SAMPLES = 4  # samples drawn at once by `lmkit sample` (and timed by `bench all`)

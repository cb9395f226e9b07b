"""Readers and writers of foreign checkpoint formats, for ``stalwart convert``, ``diff``,
``inspect`` and ``verify``.

Importing this package registers the readers with
:func:`stalwart.formats.sources.register_source`; each gives its priority, the order
in which they are tried (after the native format): DeepSpeed universal, DeepSpeed
ZeRO, torch DCP, Hugging Face Trainer / Accelerate training state, Hugging Face
weights, plain torch.save. Each module also holds the writer of its format.
"""

from __future__ import annotations

from stalwart.formats.adapters import (
    dcp,  # noqa: F401
    deepspeed,  # noqa: F401
    ds_universal,  # noqa: F401
    hf,  # noqa: F401
    hf_training,  # noqa: F401
    torch_save,  # noqa: F401
)

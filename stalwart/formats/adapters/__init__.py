"""Readers and writers of foreign checkpoint formats, for ``stalwart convert`` and ``stalwart diff``.

Importing this package registers the readers with
:func:`stalwart.formats.sources.register_source`, in the order they are tried
(after the native format): DeepSpeed universal, DeepSpeed ZeRO, torch DCP,
Hugging Face, plain torch.save. Each module also holds the writer of its format.
"""

from __future__ import annotations

from stalwart.formats.adapters import (
    dcp,  # noqa: F401
    deepspeed,  # noqa: F401
    ds_universal,  # noqa: F401  (registers before deepspeed: UCP dirs hold model states too)
    hf,  # noqa: F401
    torch_save,  # noqa: F401
)

"""Launchers: the torchrun rendezvous plugin (``--rdzv-backend=stalwart``) and ``stalwart run``.

:mod:`.membership` - stable node identities and keeper slots across re-forms;
:mod:`.rendezvous` - the ``torchrun.handlers`` plugin (torch's dynamic rendezvous + node services);
:mod:`.node` - per-agent services: reclaiming dead nodes' shared memory, stand-in keepers;
:mod:`.run` - ``stalwart run``: torchrun with stalwart's defaults.
"""

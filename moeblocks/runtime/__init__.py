"""What the commands share: errors, durable writes, device choice, threads, malloc.

A side floor of the import ladder (see CONTRIBUTING.md): nothing here imports a block,
a model or a command, so the trainer, inspection, the Hugging Face bridge and the CLI
can all use it. Import the modules by name (:mod:`moeblocks.runtime.errors`,
:mod:`~moeblocks.runtime.durable`, :mod:`~moeblocks.runtime.device`,
:mod:`~moeblocks.runtime.threads`, :mod:`~moeblocks.runtime.malloc`); this face keeps
``import moeblocks.runtime`` free of torch.
"""

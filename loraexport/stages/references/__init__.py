"""What the verify flow (``stages.verify.verify_into``) compares an export with: a reference.

Each one answers the flow's steps for one kind of export and residency — ``setup`` (providers,
threads, inputs), ``prove`` (a quantized export, weight by weight), ``parity`` (against the
unmerged model, or the weights the proof accepted), ``quality`` (what rounding costs), ``latency``
and ``close``:

* ``in_memory.InMemory``: a merged, unmerged or base export, against the model in torch;
* ``adapters.Adapters``: an adapter-mode export, each adapter against its own unmerged model;
* ``layered.Layered``: an export of a checkpoint larger than memory, against the unmerged model
  computed layer by layer from the safetensors.

The pass/fail rules they feed are written once, in ``verify.gates``.
"""

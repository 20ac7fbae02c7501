"""Group offload for training: the transformer's frozen block weights live in host RAM or in files and
visit the accelerator one group at a time, in the forward pass and again in the backward pass.

Why our own offloader rather than diffusers' ``apply_group_offloading`` (measured with diffusers 0.42.1,
optimum-quanto 0.2.7, torch 2.13, on the tiny AuraFlow with the seed's LoKr):

- int8-quanto weights: RAM mode fails with ``_apply(): Couldn't swap QLinear.weight`` and disk mode with
  ``Attempted to access the data pointer on an invalid python storage`` (safetensors cannot write quanto's
  tensor subclass). Its subclass support is hard-wired to torchao.
- Without gradient checkpointing, every weight autograd saves (``weight.t()`` views of plain weights, the
  quanto tensor itself for quanto's linear) keeps its onloaded copy alive until backward: on a GPU the whole
  model piles up in VRAM during the forward pass; a saved weight whose storage was swapped back to the host
  is the "mat2 is on cpu" in AuraFlow's backward of SimpleTuner's issue #1975.
- With gradient checkpointing, the recomputation in backward onloads each block again but stops early,
  before the hook that offloads it: after one backward 3 of the tiny model's 4 groups were left onloaded.
- Disk files are reused whenever one with the group's name exists: a different model offloaded into the
  same folder silently ran with the old model's weights (max difference 2.2 in the output).

Patching those means replacing most of its ``ModuleGroup`` and hooks, so this module is small and does
only what training needs:

- A tensor is moved as its plain leaves. Tensor subclasses that implement PyTorch's traceable-wrapper
  protocol (quanto's ``WeightQBytesTensor``/``WeightQBitsTensor``, torchao's) are flattened with
  ``__tensor_flatten__`` into their int8 data and scales, stored and copied as ordinary tensors, and
  rebuilt with ``__tensor_unflatten__`` on the accelerator. Nothing is special-cased by module or class.
- Onloading installs the rebuilt tensors as the modules' parameters and buffers; offloading installs an
  ``OffloadedTensor`` placeholder (no memory, same shape and dtype) that raises if anything computes with
  it, so a missed onload is an error naming the weight, never a silent wrong result.
- Autograd never keeps an onloaded weight: while the transformer runs forward, a ``saved_tensors_hooks``
  pair stores weights that autograd saves as a reference to their slot, and the backward pass gets the
  weight back from the slot, onloading its group if needed. (Inside checkpointed blocks PyTorch's own
  checkpoint hooks take precedence and store nothing; the recomputation onloads through the forward hook.)
- Tensor hooks on a group's outputs onload it (and prefetch the group before it) when the backward pass
  reaches it; hooks on its inputs offload it once backward has passed it; whatever is still onloaded when
  the backward pass ends is offloaded then.
- Disk files are one safetensors file per group plus ``manifest.json`` with each group's sha256 over its
  leaves: valid files are reused, stale ones rewritten; ``warm_only`` writes them without installing hooks
  (``lokr-job warm`` does, so ``train`` only checks them).

Trainable tensors (LoKr's, held by the LyCORIS network outside the transformer's module tree) are never
offloaded; the transformer's own parameters outside the block lists (patch and time embeddings, caption
projection, final norm and projection: about 1% of AuraFlow) stay on the onload device. Apply group offload
after attaching LoKr, and do not move the transformer with ``.to()`` afterwards.

Modules: ``tensors`` (plain leaves and the placeholder), ``groups`` (which modules move together),
``store`` (host RAM or files), ``settings`` (the config's flags resolved for one device), ``hooks`` (the
``GroupOffload`` that moves them), ``apply`` (from the job's config to an installed offloader, or to its
disk files only).
"""

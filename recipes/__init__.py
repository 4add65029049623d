"""The pretraining recipe, a package run from the repository's root.

* :mod:`recipes.pretrain` -- the training loop (``python -m recipes.pretrain``, ``accelerate
  launch -m recipes.pretrain``).
* :mod:`recipes.config` -- settings: :class:`~recipes.config.RecipeConfig`, the config file
  and the command line.
* :mod:`recipes.launch` -- the ``Accelerator`` and its engine (DDP, FSDP2, DeepSpeed).
* :mod:`recipes.checkpoint` -- checkpoints, and the checks before a resume loads anything.
* :mod:`recipes.files` -- crash-safe writes.
* :mod:`recipes.corpus` -- text, tokenizers and token windows.
* :mod:`recipes.demo` -- the README's main job (``python -m recipes.demo``).
"""

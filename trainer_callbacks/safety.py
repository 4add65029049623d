"""Checking a ``transformers.Trainer`` checkpoint before resuming from it.

transformers (5.x) loads a checkpoint's ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` and
``rng_state*.pth`` with ``torch.load(weights_only=True)`` and the weights from
``model.safetensors``, so a planted pickle does not run; it fails with torch's message, which
does not name the file.  :func:`verify_checkpoint` checks the same files first
(:mod:`lowrank_optim.safe_load`) and names the file and the reason.  The callbacks of this
package keep their state in ``trainer_state.json`` (transformers' ``ExportableState``): nothing
of theirs is pickled.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowrank_optim import safe_load

#: files of a Trainer checkpoint that ``Trainer.train(resume_from_checkpoint=...)`` never reads
#: (``training_args.bin`` is a pickle of the ``TrainingArguments``: never ``torch.load`` it with
#: ``weights_only=False``)
NOT_READ_AT_RESUME = frozenset({"training_args.bin"})


def verify_checkpoint(checkpoint: str | os.PathLike) -> dict[str, str]:
    """Check every file of a Trainer checkpoint that a resume reads, before it reads them.

    Call it before ``trainer.train(resume_from_checkpoint=checkpoint)``.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        A ``checkpoint-<step>`` directory.

    Returns
    -------
    dict
        Each file checked (relative path) and its kind (:func:`lowrank_optim.safe_load.file_kind`).

    Raises
    ------
    lowrank_optim.safe_load.UnsafeFileError
        A file is missing, unreadable, truncated or refused as unsafe (it names code); the
        message names the file and the reason.  ``trainer_state.json`` must be there.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise safe_load.UnsafeFileError(checkpoint, "no such checkpoint directory")
    if not (checkpoint / "trainer_state.json").is_file():
        raise safe_load.UnsafeFileError(checkpoint / "trainer_state.json", "is missing")
    return safe_load.check_directory(checkpoint, torch_globals=safe_load.NUMPY_GLOBALS,
                                     skip=NOT_READ_AT_RESUME)

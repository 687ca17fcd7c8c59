"""Read a pytorch-lightning 1.x checkpoint without importing or executing anything from it.

LID released its models as ``last.ckpt`` files written by pytorch-lightning 1.4.2's
``Trainer.save_checkpoint``. Besides ``state_dict`` such a file holds ``epoch``, ``global_step``,
``pytorch-lightning_version``, ``optimizer_states`` and ``lr_schedulers`` (plain tensors, numbers,
lists and dicts) and ``callbacks``, a dict **keyed by the callback's class**
(``{ModelCheckpoint: {"monitor": ..., "best_model_score": tensor, ...}}``; Lightning 1.5 changed the
keys to strings). The pickle therefore names the global
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``, and ``torch.load(weights_only=True)``
refuses the whole file.

:func:`load_lightning_checkpoint` still loads with ``torch.load(weights_only=True)`` (torch's
restricted unpickler, which looks globals up in an allow-list and never imports a module), and
allow-lists under the exact names a Lightning 1.x checkpoint uses inert stand-ins defined here:

- as callback keys, the built-in callbacks whose ``on_save_checkpoint`` returns a state in
  Lightning 1.0-1.4 (so their class becomes a key): ``ModelCheckpoint``, ``EarlyStopping``,
  ``Timer``, ``BackboneFinetuning`` and ``ModelPruning`` (at their ``pytorch_lightning.callbacks.*``
  module paths). The stand-ins are empty classes that cannot be instantiated: a file may name
  them, not build objects of them. Other callbacks (``LearningRateMonitor``, LID's own
  ``main.*`` callbacks) keep no state in a checkpoint and are never named by one.
- ``pytorch_lightning.utilities.parsing.AttributeDict`` (Lightning 1.0/1.1 stored
  ``hyper_parameters`` as one), read as a plain ``dict``.

Nothing else is accepted: a file naming any other global (an OmegaConf ``hyper_parameters``
container, a user's callback class, ``os.system``, ...) is refused with a
:class:`~pipeline.models.errors.LidFormatError` naming the file and the globals. Files from
Lightning >= 1.5 (string keys) and plain ``{"state_dict": ...}`` files need none of this.
The loader uses only ``state_dict``; optimizer, scheduler and callback states are ignored.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from pipeline.models.errors import LidFormatError

# Lightning 1.x built-in callbacks whose state is stored keyed by their class.
LIGHTNING_CALLBACK_CLASSES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.timer.Timer",
    "pytorch_lightning.callbacks.finetuning.BackboneFinetuning",
    "pytorch_lightning.callbacks.pruning.ModelPruning",
)
ATTRIBUTE_DICT = "pytorch_lightning.utilities.parsing.AttributeDict"


class LightningStandIn:
    """An inert stand-in for a Lightning class that a checkpoint names; it cannot be instantiated."""

    lightning_name = ""

    def __new__(cls, *args: Any, **kwargs: Any):
        raise TypeError(f"{cls.lightning_name} may appear in a LID checkpoint only as a name, not as an object")


def _stand_in(full_name: str) -> type[LightningStandIn]:
    return type(full_name.rpartition(".")[2], (LightningStandIn,), {"lightning_name": full_name})


# One distinct class per name, so that callback states keep distinct keys.
STAND_INS: dict[str, type[LightningStandIn]] = {name: _stand_in(name) for name in LIGHTNING_CALLBACK_CLASSES}
_ALLOWED: list[tuple[Any, str]] = [(cls, name) for name, cls in STAND_INS.items()] + [(dict, ATTRIBUTE_DICT)]

# torch keeps allowed globals in one process-wide set that `safe_globals` edits on entry and exit.
_LOCK = threading.Lock()


def load_lightning_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, also accepting the Lightning 1.x names above.

    Raises LidFormatError naming the file (and any global it names beyond the allow-list).
    """
    with _LOCK, torch.serialization.safe_globals(_ALLOWED):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 -- pickle, zip and torch errors come in many types
            unexpected = _unexpected_globals(path)
            if unexpected:
                raise LidFormatError(
                    f"{path}: refused: the pickle names {', '.join(unexpected)}, which is neither a tensor type "
                    "nor Lightning checkpoint bookkeeping (nothing from the file was imported or executed)"
                ) from None
            raise LidFormatError(f"{path}: cannot be read as a weights-only torch checkpoint ({error})") from None


def _unexpected_globals(path: Path) -> list[str]:
    """The globals the file's pickle names beyond torch's and our allow-list (read, not executed)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 -- not a zip checkpoint, or opcodes the scanner does not know
        return []

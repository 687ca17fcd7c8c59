"""LID's releases as pytorch-lightning 1.4.2 wrote them: loaded, and nothing from the file run.

Lightning 1.4's `last.ckpt` keys its `callbacks` dict by the callback class, so the pickle names
`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`. These tests write such a file from
the real fixture at test time, with a fake Lightning in `sys.modules` while saving only; loading
runs with every `pytorch_lightning`/`lightning` import blocked.
"""

from __future__ import annotations

import importlib.abc
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import LidFormatError, load_lid_release
from pipeline.models.lightning_checkpoint import ATTRIBUTE_DICT, LIGHTNING_CALLBACK_CLASSES, load_lightning_checkpoint
from pipeline.models.lid_release import CHECKPOINT_NAME, read_state_dict

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "seed_ldm_tiny"
TOLERANCE = 1e-4  # as in test_lid_release.py
MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
BLOCKED = ("pytorch_lightning", "lightning")


def fake_classes(patch: pytest.MonkeyPatch, *full_names: str, base: type = object) -> dict[str, type]:
    """Classes registered in `sys.modules` under `full_names` (parent packages faked too)."""
    classes = {}
    for full_name in full_names:
        module_name, _, class_name = full_name.rpartition(".")
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if not getattr(sys.modules.get(name), "__fake__", False):
                module = types.ModuleType(name)
                module.__fake__ = True
                module.__path__ = []
                patch.setitem(sys.modules, name, module)
        cls = type(class_name, (base,), {"__module__": module_name, "__qualname__": class_name})
        setattr(sys.modules[module_name], class_name, cls)
        classes[full_name] = cls
    return classes


class WarmUpSchedule:
    """A callable object as lr_lambda (LID's LambdaWarmUpCosineScheduler is one): its __dict__ is saved."""

    def __init__(self) -> None:
        self.warm_up_steps = 10
        self.last_lr = 0.0

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warm_up_steps)


def lightning14_checkpoint(state: dict, model_checkpoint: type, **extra) -> dict:
    """What pytorch-lightning 1.4.2's `dump_checkpoint` writes for LID's trainer (no hparams).

    `extra` keys come first, so that an unpickler that runs code meets them before anything else.
    """
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=[WarmUpSchedule(), lambda step: 1.0])
    for _ in range(2):
        sum(p.sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
    return {
        **extra,
        "epoch": 12,
        "global_step": 4000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {
            model_checkpoint: {
                "monitor": "val/loss_simple_ema",
                "best_model_score": torch.tensor(0.0123),
                "best_model_path": "/logs/2024-01-01T00-00-00_lid/checkpoints/epoch=000011.ckpt",
                "current_score": torch.tensor(0.0145),
                "dirpath": "/logs/2024-01-01T00-00-00_lid/checkpoints",
            }
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
    }


def write_lightning14_folder(folder: Path, **extra) -> Path:
    """A copy of the fixture folder whose last.ckpt has Lightning 1.4's layout (and `extra` keys)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    for config in FIXTURE.glob("configs/*-project.yaml"):
        shutil.copyfile(config, folder / "configs" / config.name)
    path = folder / CHECKPOINT_NAME
    state = torch.load(FIXTURE / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["state_dict"]
    with pytest.MonkeyPatch.context() as patch:
        model_checkpoint = fake_classes(patch, MODEL_CHECKPOINT)[MODEL_CHECKPOINT]
        torch.save(lightning14_checkpoint(state, model_checkpoint, **extra), path)
    assert not [name for name, module in sys.modules.items() if getattr(module, "__fake__", False) and
                name.split(".")[0] in BLOCKED]  # the fake Lightning is gone before anything is loaded
    return folder


class ImportBlocker(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            self.attempts.append(name)
            raise ImportError(f"test: importing {name} is not allowed while loading a checkpoint")
        return None


@pytest.fixture
def no_lightning(monkeypatch):
    """Hide any loaded Lightning and refuse to import it; yields the blocker to inspect afterwards."""
    for name in [name for name in sys.modules if name.split(".")[0] in BLOCKED]:
        monkeypatch.delitem(sys.modules, name)
    blocker = ImportBlocker()
    monkeypatch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
    yield blocker
    assert blocker.attempts == []
    assert not [name for name in sys.modules if name.split(".")[0] in BLOCKED]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    if not (FIXTURE / "golden.npz").is_file():
        pytest.fail(f"LID fixture missing: expected {FIXTURE} (../shared next to the repo)")
    with np.load(FIXTURE / "golden.npz") as data:
        return {name: data[name] for name in data.files}


def test_lightning14_release_loads_like_the_original(tmp_path, golden, no_lightning):
    folder = write_lightning14_folder(tmp_path / "release")
    path = folder / CHECKPOINT_NAME
    # The file is what the issue describes: plain weights-only loading refuses it for this global.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [MODEL_CHECKPOINT]
    with pytest.raises(pickle.UnpicklingError, match=MODEL_CHECKPOINT):
        torch.load(path, map_location="cpu", weights_only=True)

    ours, original = read_state_dict(path), read_state_dict(FIXTURE / CHECKPOINT_NAME)
    assert list(ours) == list(original)
    assert all(torch.equal(ours[key], original[key]) and ours[key].dtype == original[key].dtype for key in original)

    release = load_lid_release(folder)
    assert release.provenance["lid_release"]["checkpoint"] == str(path)
    with torch.no_grad():
        context = release.condition(torch.from_numpy(golden["cond_in"]))
        eps = release.unet(
            torch.from_numpy(golden["unet_x"]),
            torch.from_numpy(golden["unet_t"]).float(),
            encoder_hidden_states=torch.from_numpy(golden["cond_out"]),
        ).sample
    assert np.max(np.abs(context.numpy().astype(np.float64) - golden["cond_out"])) < TOLERANCE
    assert np.max(np.abs(eps.numpy().astype(np.float64) - golden["unet_out"])) < TOLERANCE


class SystemCall:
    """Unpickling this runs `touch marker` through os.system (the global named is posix.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def evil_payload(patch: pytest.MonkeyPatch, marker: Path) -> tuple[object, str]:
    """An `evil_module.Payload` whose unpickling creates `marker` (the module stays importable)."""
    payload_class = fake_classes(patch, "evil_module.Payload")["evil_module.Payload"]

    def new(cls, marker=None, fire=False):
        if fire:
            Path(marker).touch()
        return object.__new__(cls)

    payload_class.__new__ = new
    payload_class.__reduce__ = lambda self: (payload_class, (str(marker), True))
    return payload_class(), "evil_module.Payload"


def system_payload(patch: pytest.MonkeyPatch, marker: Path) -> tuple[object, str]:
    return SystemCall(marker), f"{os.system.__module__}.system"


@pytest.mark.parametrize("make_payload", [evil_payload, system_payload])
def test_lightning14_release_with_an_unknown_global_is_refused(tmp_path, make_payload, monkeypatch, no_lightning):
    control, marker = tmp_path / "control", tmp_path / "marker"
    payload, global_name = make_payload(monkeypatch, control)
    pickle.loads(pickle.dumps(payload))  # the payload is live: ordinary unpickling runs it
    assert control.exists()

    payload, _ = make_payload(monkeypatch, marker)
    extra = {"on_save_checkpoint": {"payload": payload}}
    folder = write_lightning14_folder(tmp_path / "release", **extra)
    path = folder / CHECKPOINT_NAME
    for load in (lambda: read_state_dict(path), lambda: load_lid_release(folder)):
        with pytest.raises(LidFormatError) as error:
            load()
        message = str(error.value)
        assert str(path) in message
        assert global_name in message
        assert MODEL_CHECKPOINT not in message  # the known Lightning class is not what is refused
    assert not marker.exists()


def test_known_lightning_names_are_accepted_and_objects_of_them_refused(tmp_path, no_lightning):
    """Every allow-listed name as Lightning 1.x writes it; an instance of one is not bookkeeping."""
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    with pytest.MonkeyPatch.context() as patch:
        callbacks = fake_classes(patch, *LIGHTNING_CALLBACK_CLASSES)
        attribute_dict = fake_classes(patch, ATTRIBUTE_DICT, base=dict)[ATTRIBUTE_DICT]
        hparams = attribute_dict(learning_rate=1e-4, nested=attribute_dict(a=1))
        torch.save(
            {"state_dict": state, "callbacks": {cls: {"n": i} for i, cls in enumerate(callbacks.values())},
             "hparams_name": "kwargs", "hyper_parameters": hparams},
            tmp_path / "names.ckpt",
        )
        torch.save({"state_dict": state, "trainer_callbacks": [callbacks[MODEL_CHECKPOINT]()]},
                   tmp_path / "instance.ckpt")
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "names.ckpt")) == {
        *LIGHTNING_CALLBACK_CLASSES, ATTRIBUTE_DICT
    }
    assert torch.equal(read_state_dict(tmp_path / "names.ckpt")["w"], state["w"])
    loaded = load_lightning_checkpoint(tmp_path / "names.ckpt")
    assert sorted(cls.lightning_name for cls in loaded["callbacks"]) == sorted(LIGHTNING_CALLBACK_CLASSES)
    assert type(loaded["hyper_parameters"]) is dict and loaded["hyper_parameters"]["nested"] == {"a": 1}
    with pytest.raises(LidFormatError, match=r"instance\.ckpt: cannot be read.*ModelCheckpoint"):
        read_state_dict(tmp_path / "instance.ckpt")


def test_state_dict_of_non_tensors_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2), "step": 3}}, tmp_path / "x.ckpt")
    with pytest.raises(LidFormatError, match=r"x\.ckpt: state_dict entries that are not tensors: \['step'\]"):
        read_state_dict(tmp_path / "x.ckpt")

"""The Lightning Trainer that `make_trainer` builds: a bar that counts optimizer steps, and trainer
settings that Lightning refuses, caught before any stage starts."""
import os
import re

import lightning as L
import torch

from compress import training
from compress.cli import main
from compress.config import load_config
from conftest import TINY


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_progress_bar_counts_optimizer_steps_of_max_steps(tmp_path):
    cfg = load_config(["trainer=cpu", "trainer.accelerator=cpu", "finetune.max_steps=3", "finetune.grad_accum=2",
                       "finetune.val_every=0"])
    trainer = training.make_trainer(cfg.trainer, cfg.finetune, tmp_path, has_val=False)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, training.StepProgressBar)
    batches = torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=2)  # 8 micro-batches: more than 3 x 2
    trainer.fit(_Tiny(), batches)
    task = bar.train_progress_bar
    assert (task.total, task.completed, task.description) == (3, 3, "step 3/3")  # not `Epoch 0/-2`, nor 6 batches
    assert "train/loss" in bar.get_metrics(trainer, trainer.lightning_module)

    off = load_config(["trainer=cpu", "trainer.progress_bar=false"])
    assert training.make_trainer(off.trainer, off.finetune, tmp_path / "off", has_val=False).progress_bar_callback is None


def test_strategy_lightning_refuses_fails_before_any_stage(tmp_path, capsys):
    capsys.readouterr()
    code = main(["run", *TINY, "trainer=ddp-cpu", "trainer.strategy=fsdp", f"run.root={tmp_path}", "run.name=N"])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    msg = " ".join(err.split())
    assert "trainer.strategy='fsdp'" in msg and "requires a GPU accelerator" in msg, msg
    preset = re.search(r"use a preset that works on this machine: trainer=([\w-]+)", msg)
    assert preset, msg
    assert training.trainer_problems(load_config([f"trainer={preset[1]}"]).trainer) == []  # the fix works
    assert not (tmp_path / "N").exists() or not any(p.is_dir() for p in (tmp_path / "N").iterdir())  # nothing ran


def test_valid_presets_pass_and_only_training_pipelines_are_checked():
    for overrides in (["trainer=cpu"], ["trainer=ddp-cpu"]):
        assert training.trainer_problems(load_config(overrides).trainer) == []
    assert not torch.distributed.is_initialized() and "LOCAL_RANK" not in os.environ  # asked, nothing launched
    from compress.validate import validate

    validate(load_config([*TINY, "trainer=ddp-cpu", "trainer.strategy=fsdp", "pipeline=evaluate"]))  # never trains

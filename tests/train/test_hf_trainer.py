"""vlmopt.train.CompiledTrainer: HF's Trainer with the compiled training loss, pass state in checkpoints."""

import copy
import warnings

import torch
from transformers import TrainingArguments

import vlmopt
from tests.conftest import padded_batch
from tests.train.train_helpers import random_labels
from vlmopt.passes import ReGATE


def dataset(model):
    items = []
    for index, seed in enumerate((81, 83, 85)):
        batch = padded_batch(model, seed=seed)
        labels = random_labels(batch, seed=seed + 1, fraction=0.8)
        items.append({**batch, "labels": labels, "sample_ids": torch.tensor([2 * index, 2 * index + 1])})
    return items


def arguments(folder, steps):
    return TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=1, learning_rate=0.05, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False, lr_scheduler_type="constant",
        warmup_steps=0, seed=0, dataloader_num_workers=0,
    )


def test_trainer_trains_saves_the_pass_state_and_resumes(llava_clip, tmp_path):
    warnings.simplefilter("ignore")
    config = ReGATE(keep=0.5, warmup_steps=1, cycle=2, dense_steps=1)
    data = dataset(llava_clip)

    model = copy.deepcopy(llava_clip)
    opt = vlmopt.compile(model, [config], mode="train")
    trainer = vlmopt.train.CompiledTrainer(opt, args=arguments(tmp_path / "a", 4), train_dataset=data,
                                           data_collator=lambda items: items[0])
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert opt.pass_state("regate").step == 4 and len(logged) == 4
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "vlmopt_pass_states.pt", weights_only=True)
    assert saved["regate"]["step"] == 2

    again = copy.deepcopy(llava_clip)
    resumed = vlmopt.compile(again, [config], mode="train")
    trainer = vlmopt.train.CompiledTrainer(resumed, args=arguments(tmp_path / "a", 4), train_dataset=data,
                                           data_collator=lambda items: items[0])
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    # 2 steps from the checkpoint's state: had it not been restored, the counter would read 2.
    assert resumed.pass_state("regate").step == 4
    assert sorted(resumed.pass_state("regate").ema) == sorted(opt.pass_state("regate").ema) == [0, 1, 2, 3, 4, 5]

"""Runs TRL's SFTTrainer for bench.peers, in TRL's own environment (not plora's).

The job: plain texts (``{"text": ...}`` JSONL), packing "bfd", padding-free, LoRA on all linear
layers, float32, on the CPU, ``max_steps`` steps. Records for every optimizer step the wall and CPU time when
it ends and the real tokens of its batch (padding-free: every token of the collated batch).

    python -P bench/peer_trl.py RESULT_JSON MODEL_DIR TEXTS_JSONL STEPS BATCH MAX_LENGTH OUT_DIR
"""

import json
import sys
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())


def main() -> None:
    result, model_dir, texts = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    steps, batch, max_length, out_dir = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        max_steps=steps,
        max_length=max_length,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        learning_rate=1e-4,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=42,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=texts, split="train"),
        processing_class=tokenizer,
        peft_config=lora,
    )
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collate(examples):  # type: ignore[no-untyped-def]
        out = collate(examples)
        tokens.append(int(out["input_ids"].numel()))  # padding-free: no padding in the batch
        return out

    trainer.data_collator = counting_collate  # the loader is made in train(), after this
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    result.write_text(
        json.dumps({"times": clock.times, "cpu": clock.cpu, "tokens": tokens[: len(clock.times)]})
    )


if __name__ == "__main__":
    main()

"""SIGReg with the Hugging Face ``Trainer``: ``SIGRegTrainer`` regularizes a small ViT
(built from a config, no download) on 10k Fashion-MNIST images for one epoch.

    python examples/hf_trainer.py              # about 10 s on 2 idle CPU cores
    python examples/hf_trainer.py --no-sigreg  # the plain transformers.Trainer

Each training log gains ``sigreg/loss``, ``sigreg/loss/<layer>`` and
``sigreg/eff_dim/<layer>``. For a language model, regularize every token of the residual
stream: ``sigreg=dict(layers="transformer.h.*", pool="flatten", alpha=0.01)`` (GPT-2).
"""

from __future__ import annotations

import argparse

import numpy as np
from _data import fashion_mnist
from transformers import (
    EvalPrediction,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from sigreg.integrations.transformers import SIGRegTrainer


def as_records(dataset) -> list[dict]:
    """(image, label) pairs as the dicts a Hugging Face model takes as keyword arguments."""
    return [{"pixel_values": x, "labels": int(y)} for x, y in zip(*dataset.tensors, strict=True)]


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (tests)")
    parser.add_argument("--no-sigreg", action="store_true")
    parser.add_argument("--out", default="runs/examples/hf")
    args = parser.parse_args(argv)

    train, test = fashion_mnist(num_train=10000, num_test=1000)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64,
                       num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       num_labels=10)
    training = TrainingArguments(
        output_dir=args.out, num_train_epochs=1, max_steps=args.max_steps,
        per_device_train_batch_size=64, per_device_eval_batch_size=500, learning_rate=1e-3,
        logging_steps=25, save_strategy="no", report_to="none", use_cpu=True, seed=0)
    common = dict(model=ViTForImageClassification(config), args=training,
                  train_dataset=as_records(train), eval_dataset=as_records(test),
                  compute_metrics=accuracy)
    if args.no_sigreg:
        trainer = Trainer(**common)
    else:
        # Every encoder layer, on its CLS token (pool="mean" would take the token mean).
        trainer = SIGRegTrainer(**common, sigreg=dict(layers="vit.layers.*", pool="cls",
                                                      alpha=0.1))
    trainer.train()
    metrics = trainer.evaluate()
    print(f"eval accuracy {metrics['eval_accuracy']:.1%}")
    return metrics


if __name__ == "__main__":
    main()

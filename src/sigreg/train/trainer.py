"""The training loop: one function, read top to bottom.

Data lives on the device as uint8 and is augmented there batch by batch; the regularizer is
attached with :func:`sigreg.attach` at the model's own ``sigreg_layers``. The run directory
(what is written when, and how a resume repairs it) is :mod:`sigreg.train.rundir`'s job:
a crash loses at most the epoch in progress and ``resume=True`` continues exactly where the
last checkpoint was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import attach
from . import checkpoint
from .augment import AugmentConfig, BatchAugmenter
from .config import TrainConfig
from .data import ImageDataset, load_dataset
from .models import build_model
from .monitor import CollapseMonitor
from .optim import Schedule, build_optimizer, lr_factor
from .provenance import provenance
from .rundir import RunDir, Start, claim, plan
from .runtime import (
    Runtime,
    average_buffers,
    average_gradients,
    broadcast_state,
    distributed_runtime,
    gather_from_ranks,
    launched_rank,
    sum_over_ranks,
)

CHECK_EVERY = 25  # steps between non-finite checks (each one is a device sync)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def load_data(cfg: TrainConfig) -> ImageDataset:
    if cfg.dataset == "synthetic":  # sized by num_train / num_test instead of subsetting
        sizes = {k: v for k, v in (("num_train", cfg.num_train), ("num_test", cfg.num_test)) if v}
        return load_dataset("synthetic", seed=cfg.seed, **sizes)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.num_train is not None or cfg.num_test is not None:
        data = data.subset(cfg.num_train, cfg.num_test, seed=cfg.seed)
    return data


def _own_rng_state(state: dict[str, Any], rt: Runtime, log) -> dict[str, torch.Tensor]:
    """This rank's augmenter, CPU and (if saved) CUDA RNG states from a checkpoint.

    Checkpoints from before per-rank states (keys ``augmenter`` / ``rng_cpu`` /
    ``rng_cuda``) hold rank 0's only. A job resumed on a different number of ranks cannot repeat the interrupted
    run's draws; ranks beyond the saved ones reuse rank 0's state, said once in the log.
    """
    if "rng_ranks" not in state:
        saved = {"augmenter": [state["augmenter"]["generator"]], "cpu": [state["rng_cpu"]]}
        if "rng_cuda" in state:
            saved["cuda"] = [state["rng_cuda"]]
    else:
        saved = state["rng_ranks"]
    count = len(saved["cpu"])
    if count != rt.world_size and rt.is_main:
        log(f"note: the checkpoint holds random states for {count} rank(s), this job has "
            f"{rt.world_size}: augmentations will differ from an uninterrupted run")
    index = rt.rank if rt.rank < count else 0
    return {key: states[index].cpu() for key, states in saved.items()}


# Scalars of an epoch row that TensorBoard shows, at step = epoch.
EPOCH_SCALARS = ("train_loss", "task_loss", "reg_loss", "train_acc", "test_loss", "test_acc",
                 "images_per_s")


def _open_tensorboard(run: RunDir):
    """A TensorBoard writer for the run, or None without tensorboard. The events are a view
    of the metrics rows, rebuilt from them at every start (:meth:`RunDir.begin` removed the
    old ones): an interrupted epoch's events, or ones a crash kept from being flushed,
    cannot be duplicated or lost."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    writer = SummaryWriter(str(run.tensorboard))
    for row in run.rows:
        _log_scalars(writer, row)
    return writer


def _log_scalars(writer, row: dict[str, Any]) -> None:
    """An epoch row's scalars at step = epoch; a monitor row's ``eff_dim/<layer>`` at its
    training step."""
    if row["kind"] == "epoch":
        for key in EPOCH_SCALARS:
            if key in row:  # rows of older versions may lack some
                writer.add_scalar(key, row[key], row["epoch"])
    elif row["kind"] == "monitor":
        for name, value in row["eff_dim"].items():
            writer.add_scalar(f"eff_dim/{name}", value, row["step"])


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, augmenter: BatchAugmenter, cfg: TrainConfig,
             rt: Runtime, autocast) -> tuple[float, float]:
    """Test loss and accuracy; each rank takes a shard and the sums are all-reduced."""
    model.eval()
    images, labels = data.test_images, data.test_labels
    shard = torch.arange(rt.rank, images.shape[0], rt.world_size, device=images.device)
    sums = torch.zeros(3, device=rt.device)  # loss sum, correct, count
    for idx in shard.split(cfg.eval_batch_size):
        batch = augmenter(images[idx], labels[idx], train=False)
        with autocast:
            logits = model(batch.images).float()
        sums[0] += nn.functional.cross_entropy(logits, batch.targets, reduction="sum")
        sums[1] += (logits.argmax(1) == batch.targets).sum()
        sums[2] += idx.numel()
    loss, correct, count = sum_over_ranks(sums, rt).tolist()
    model.train()
    return loss / count, correct / count


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool | str = False,
          overwrite: bool = False, allow_changes: Sequence[str] = (), progress: bool = True,
          log=print) -> dict[str, Any]:
    """Train one run into ``out_dir``; returns the summary also written to ``summary.json``.

    ``resume``, ``overwrite`` and ``allow_changes`` are explained in :func:`rundir.plan`,
    which checks everything before the first file is written. Under torchrun every rank
    calls this and gets the same summary; rank 0 writes the files.

    The run directory's lock is held throughout (rank 0's under torchrun, the writer's):
    RunLocked (a ValueError) naming the holder's PID where another process writes it.
    """
    cfg.validate()  # a bad setting is reported as such, before the lock is taken
    with claim(out_dir) if launched_rank() == 0 else nullcontext():
        start = plan(cfg, out_dir, resume=resume, overwrite=overwrite,
                     allow_changes=allow_changes)
        return _train(start, Path(out_dir), progress, log)


def _train(start: Start, out_dir: Path, progress: bool, log) -> dict[str, Any]:
    """:func:`train` once the run directory is claimed and the start planned."""
    cfg = start.cfg
    with distributed_runtime(cfg.device) as rt:
        log = log if rt.is_main else _silent  # one voice under torchrun
        # Data on the device, model, regularizer, optimizer: all checked before any write.
        torch.manual_seed(cfg.seed)
        data = load_data(cfg).to(rt.device)
        channels, height, _ = data.image_shape
        model = build_model(cfg.model, num_classes=data.num_classes, image_size=height,
                            in_channels=channels, **cfg.model_args).to(rt.device)
        handle = None
        if cfg.sigreg != "none":
            extra = {"weak": {"scale_invariant": cfg.scale_invariant},
                     "strong": {"t_max": cfg.t_max, "num_points": cfg.num_points},
                     "vicreg": {"var_weight": cfg.vicreg_var_weight,
                                "cov_weight": cfg.vicreg_cov_weight}}.get(cfg.sigreg, {})
            handle = attach(model, model.sigreg_layers, cfg.sigreg, _sketch_dim(cfg, model),
                            model.sigreg_pool, sketch_policy=cfg.sketch_policy,
                            seed=cfg.seed, alpha=cfg.alpha, compile=cfg.compile,
                            **extra)  # compiled with the model
        monitor = CollapseMonitor(model, model.sigreg_layers, model.sigreg_pool,
                                  cfg.monitor_every, cfg.collapse_threshold, warn=log)
        net = torch.compile(model) if cfg.compile else model
        optimizer = build_optimizer(model, cfg)
        # Drop the last partial batch: a tiny final batch gives a noisy covariance.
        local_batch = cfg.batch_size // rt.world_size
        if local_batch < 2:
            raise ValueError(f"batch_size {cfg.batch_size} is too small for {rt.world_size} ranks")
        steps_per_epoch = data.train_images.shape[0] // (local_batch * rt.world_size)
        if steps_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the "
                             f"{data.train_images.shape[0]} training images")
        schedule = Schedule(optimizer, cfg, steps_per_epoch)
        augmenter = BatchAugmenter(
            AugmentConfig(cfg.crop_padding, cfg.flip, cfg.randaugment_ops,
                          cfg.randaugment_magnitude, cfg.mixup_alpha, cfg.cutmix_alpha),
            data.mean, data.std, seed=cfg.seed * 1000 + rt.rank,
        )
        use_amp = cfg.amp and rt.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
        if start.state is not None:
            _restore(start.state, out_dir / "checkpoint.pt", model, optimizer, handle,
                     augmenter, rt, log)
        broadcast_state(model, rt)  # every rank starts from rank 0's weights

        # The first write: the run directory is reset or repaired for this start.
        run = RunDir(out_dir, write=rt.is_main)
        run.begin(start, {**provenance(rt.device), "world_size": rt.world_size})
        if start.state is not None:
            changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in start.changes.items())
            log(f"resumed {out_dir} at epoch {start.epoch}/{cfg.epochs}"
                + (f"; changed: {changed}" if changed else ""))
            note = _schedule_note(start, steps_per_epoch)
            if note:
                log(note)

        writer = _open_tensorboard(run) if rt.is_main else None
        for epoch in range(start.epoch + 1, cfg.epochs + 1):
            # Same permutation on every rank; each takes its own slice of every global batch.
            order = torch.randperm(data.train_images.shape[0], generator=torch.Generator()
                                   .manual_seed(cfg.seed * 100003 + epoch)).to(rt.device)
            sums = torch.zeros(4, device=rt.device)  # loss, task loss, reg loss, correct
            layer_sums: dict[str, torch.Tensor] = {}
            alphas: list[torch.Tensor] = []  # alpha=auto: the weight of every step
            bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", progress and rt.is_main)
            t0 = time.perf_counter()
            for i in range(steps_per_epoch):
                step = (epoch - 1) * steps_per_epoch + i
                lr_scale = schedule.set(step)
                start_index = (i * rt.world_size + rt.rank) * local_batch
                idx = order[start_index:start_index + local_batch]
                batch = augmenter(data.train_images[idx], data.train_labels[idx])

                with monitor.recording(step), autocast:
                    logits = net(batch.images)
                task = batch.loss(logits.float())
                if handle is not None:
                    reg = handle.loss()
                    loss = handle.weigh(task, reg)  # alpha=auto: this step's weight
                    if handle.auto is not None:
                        alphas.append(handle.auto.alpha)
                else:
                    reg, loss = torch.zeros((), device=rt.device), task

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(model.parameters(), rt)
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                if handle is not None:
                    handle.settle()  # alpha=auto: the next weight, the same on every rank

                sums += torch.stack([loss.detach(), task.detach(), reg.detach(),
                                     batch.correct(logits.detach())])
                if handle is not None:
                    for name, value in handle.layer_loss_tensors().items():
                        layer_sums[name] = layer_sums.get(name, 0) + value
                if monitor.due(step) and rt.is_main:
                    row = monitor.measure(step, epoch)
                    run.log_row(row)
                    if writer:
                        _log_scalars(writer, row)
                if (i + 1) % CHECK_EVERY == 0 or i + 1 == steps_per_epoch:
                    # Every rank tests the same global sum, so all stop together: a rank that
                    # stopped alone would leave the others waiting in their next collective.
                    running = sum_over_ranks(sums[:1].clone(), rt).item() / ((i + 1) * rt.world_size)
                    if not math.isfinite(running):
                        kept = f"{run.checkpoint} (epoch {epoch - 1})" if epoch > 1 else "none yet"
                        raise TrainingDiverged(
                            f"loss became non-finite in epoch {epoch} by step {i + 1}; last good "
                            f"checkpoint: {kept}. Try a lower lr, grad_clip=1 or a larger alpha."
                        )
                    if bar is not None:
                        bar.set_postfix(loss=f"{running:.3f}")
                if bar is not None:
                    bar.update()
            if bar is not None:
                bar.close()
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            train_time = time.perf_counter() - t0

            # Epoch metrics (the same on every rank), then the commit: checkpoint, then row.
            average_buffers(model, rt)
            loss_sum, task_sum, reg_sum, correct = sum_over_ranks(sums, rt).tolist()
            images_seen = steps_per_epoch * local_batch * rt.world_size
            per_step = 1.0 / (steps_per_epoch * rt.world_size)  # mean over steps and ranks
            test_loss, test_acc = evaluate(model, data, augmenter, cfg, rt, autocast)
            row = {
                "kind": "epoch", "epoch": epoch,
                "train_loss": loss_sum * per_step, "task_loss": task_sum * per_step,
                "reg_loss": reg_sum * per_step,
                "reg_layers": {n: float(v) / steps_per_epoch for n, v in layer_sums.items()},
                "train_acc": correct / images_seen,
                "test_loss": test_loss, "test_acc": test_acc,
                "lr": cfg.lr * lr_scale, "epoch_time": train_time,
                "images_per_s": images_seen / train_time,
            }
            if alphas:  # the weight's trajectory, one value per step, and its mean
                row["alpha_steps"] = torch.stack(alphas).tolist()
                row["alpha"] = sum(row["alpha_steps"]) / len(alphas)
            # Each rank draws its own augmentations: keep every rank's streams (a collective,
            # so all ranks take part; only rank 0 writes).
            rng_ranks = {
                "augmenter": gather_from_ranks(augmenter.state_dict()["generator"], rt),
                "cpu": gather_from_ranks(torch.get_rng_state(), rt),
            }
            if rt.device.type == "cuda":
                rng_ranks["cuda"] = gather_from_ranks(torch.cuda.get_rng_state(rt.device), rt)
            run.commit_epoch({
                "config": cfg.to_dict(), "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "sigreg": handle.state_dict() if handle is not None else {},
                "rng_ranks": rng_ranks,
            }, row)
            if writer:
                _log_scalars(writer, row)
            log(f"epoch {epoch:3d}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                f"train acc {row['train_acc']:.2%}  test acc {test_acc:.2%}  "
                f"{train_time:.1f}s  {row['images_per_s']:.0f} img/s")

        if writer:
            writer.close()
        return run.finish(cfg)


def _sketch_dim(cfg: TrainConfig, model: nn.Module) -> int | None | dict[str, int | None]:
    """``sketch_dim``, or ``sketch_dim_per_layer`` as {layer name: K} for attach."""
    dims = cfg.layer_sketch_dims()
    if dims is None:
        return cfg.sketch_dim
    layers = model.sigreg_layers
    if len(dims) != len(layers):
        raise ValueError(f"sketch_dim_per_layer must give one K per regularized layer: "
                         f"{len(layers)} for this model ({', '.join(layers)}), got {len(dims)}")
    return dict(zip(layers, dims, strict=True))


def _schedule_note(start: Start, steps_per_epoch: int) -> str | None:
    """What a resume that changes the number of epochs does to a cosine schedule, which
    follows the new length: the learning rate jumps (from about eta_min back up, when a
    finished run is extended) and the schedule goes on from that point of the new curve."""
    old, new = TrainConfig.from_dict(start.state["config"]), start.cfg
    if "epochs" not in start.changes or new.schedule != "cosine" or start.epoch >= new.epochs:
        return None

    def lr(cfg: TrainConfig, step: int) -> float:
        return cfg.lr * lr_factor(step, cfg.epochs * steps_per_epoch,
                                  round(cfg.warmup_epochs * steps_per_epoch), cfg.schedule,
                                  cfg.eta_min / cfg.lr)

    step = start.epoch * steps_per_epoch
    return (f"note: epochs {old.epochs} -> {new.epochs} changes the cosine schedule: the "
            f"learning rate was {lr(old, step - 1):.3g} at the end of epoch {start.epoch} and "
            f"is {lr(new, step):.3g} at the start of epoch {start.epoch + 1}: the schedule "
            f"restarts from there over the new length, down to eta_min={new.eta_min:g} at "
            f"epoch {new.epochs}")


def _silent(_line: str) -> None:
    pass


def _restore(state: dict[str, Any], path: Path, model: nn.Module, optimizer, handle,
             augmenter: BatchAugmenter, rt: Runtime, log) -> None:
    """Load a checkpoint into the run's objects (CheckpointError where it does not fit)."""
    checkpoint.restore(model, state, "model", path)
    checkpoint.restore(optimizer, state, "optimizer", path)
    if handle is not None:
        checkpoint.restore(handle, state, "sigreg", path)
    try:  # checked by checkpoint.check_fields, but for the CUDA state's size
        rng = _own_rng_state(state, rt, log)
        augmenter.load_state_dict({"generator": rng["augmenter"]})
        torch.set_rng_state(rng["cpu"])
        if rt.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], rt.device)
    except (KeyError, IndexError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise checkpoint.CheckpointError(f"{path} has no usable random states ({first})") from exc

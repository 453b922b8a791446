"""What every training stage shares: trainer arguments, callbacks, the loss gate, adapter saving, and
`run_trainer_stage`, the skeleton of a stage (read split -> plan -> tokenizer -> trainer arguments ->
Training with resume, OOM and NaN guards -> save -> gate -> outputs). A stage module keeps only what is
its own: its dataset, its TRL arguments and the extra parts of its trainer."""

from __future__ import annotations

import json
import math
import os
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import sharding, trackers
from .compat import lm_head_on_loss_positions, sampling_kwargs, warmup_kwargs
from .config import Config, StageTrainingConfig
from .console import ConsoleProgress, remove_library_printers
from .dist import is_main, world_size
from .guards import (
    COMPLETE,
    CheckpointMarker,
    FaultInjector,
    JsonlLogCallback,
    StopRequest,
    checkpoint_dirs,
    fault,
)
from .launch import agree_all
from .modeling import Plan
from .stages import Gate, GateFailed, StageContext, StageResult, StageStopped

SAVE_MARGIN_S = 5.0  # time kept free before a deadline for the last checkpoint save

SMOKE_STEPS = 3


def trainer_args(
    cfg: Config, stage: str, stage_dir: Path, plan: Plan, config_cls: type, smoke: bool
) -> dict[str, Any]:
    """Keyword arguments for TRL's SFTConfig / DPOConfig, from the stage section and the shared defaults."""
    s: StageTrainingConfig = getattr(cfg, stage)
    t = cfg.training
    checkpointing = s.gradient_checkpointing
    if checkpointing == "auto":
        # Checkpointing trades ~30% compute for activation memory: only when the memory plan needs it.
        checkpointing = auto_checkpointing(cfg, stage, plan.device)
    batch, accum, max_steps = s.per_device_train_batch_size, s.gradient_accumulation_steps, s.max_steps
    if smoke:
        batch, accum, max_steps = min(batch, 2), 1, SMOKE_STEPS
    return {
        "output_dir": str(stage_dir / "checkpoints"),
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "learning_rate": s.learning_rate,
        "num_train_epochs": s.num_train_epochs,
        "max_steps": max_steps,
        "lr_scheduler_type": t.lr_scheduler_type,
        **warmup_kwargs(config_cls, t.warmup_ratio),
        # Length grouping: the stage puts its rows in a seeded length-grouped order and the trainer
        # reads them in that order. (transformers' LengthGroupedSampler draws from the global RNG,
        # so a run resumed in a later epoch would see another order than the uninterrupted one.)
        **sampling_kwargs(config_cls, "sequential" if s.group_by_length else "random"),
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optim,
        "logging_steps": 1 if smoke else t.logging_steps,
        "save_strategy": "steps" if t.save_steps else "no",
        "save_steps": t.save_steps or 500,
        "save_total_limit": None,  # CheckpointMarker rotates: it keeps complete ones and the best
        "seed": t.seed,
        "data_seed": t.seed,
        # training.report_to, the run name <project>/<stage> and trackio's project.
        **trackers.trainer_kwargs(cfg, stage),
        "use_cpu": plan.device == "cpu",
        "bf16": plan.bf16_autocast or (plan.device == "cuda" and plan.dtype == "bfloat16"),
        "fp16": plan.device == "cuda" and plan.dtype == "float16",
        # transformers >= 5.2x names it activation_checkpointing; compat passes the old name to older ones.
        "activation_checkpointing": bool(checkpointing),
        "activation_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "dataloader_num_workers": 0,
        # LoRA under DDP uses every trainable parameter in each step: skip DDP's unused-parameter scan.
        "ddp_find_unused_parameters": False if world_size() > 1 else None,
        # Log NaN/inf as they are; the default filter would average them away.
        "logging_nan_inf_filter": False,
        "max_length": cfg.data.max_length,
        # ConsoleProgress prints one line per logging step instead of tqdm's bar and the raw log dicts.
        "disable_tqdm": True,
        # For tokens/s on the console: real tokens, padding not counted (transformers >= 4.56).
        "include_num_input_tokens_seen": "non_padding",
        # hardware.sharding: FSDP2 / DeepSpeed ZeRO arguments ({} for DDP and one process); last, as
        # FSDP takes activation checkpointing into its own config.
        **sharding.trainer_kwargs(cfg, stage, plan.device, world_size(), checkpointing=bool(checkpointing)),
    }


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def auto_checkpointing(cfg: Config, stage: str, device: str) -> bool:
    if device != "cuda":
        return False
    import torch

    from .modeling import local_rank
    from .planner import checkpointing_decision

    # This GPU's memory; without a visible GPU (a plan made elsewhere) hardware.gpu_memory_gb decides.
    memory = None
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(local_rank()).total_memory
    return checkpointing_decision(cfg, stage, device="cuda", memory_bytes=memory)[0]  # type: ignore[arg-type]


LOSS_GATE_MIN_STEPS = 10  # below this, first-vs-last quarter means are per-batch noise


def loss_gate(rows: list[dict[str, Any]], require_falling: bool | str) -> list[Gate]:
    """Gate: training started, every logged loss is finite, and the loss fell.

    `require_falling` is training.loss_falling_gate: auto checks it on runs with at least
    LOSS_GATE_MIN_STEPS logged steps (on shorter ones the quarters are one or two batches each, and
    length-grouped batches differ in loss more than a few steps of learning move it), true on any run
    with two or more, false never."""
    losses = [r["loss"] for r in rows if "loss" in r]
    gates = [Gate("training_started", bool(losses), f"{len(losses)} logged steps")]
    if not losses:
        return gates
    finite = all(math.isfinite(x) for x in losses)
    gates.append(Gate("loss_finite", finite, "all finite" if finite else "NaN/inf loss logged"))
    if not finite or require_falling is False:
        return gates
    if require_falling == "auto" and len(losses) < LOSS_GATE_MIN_STEPS:
        gates.append(
            Gate(
                "loss_falling",
                True,
                f"not checked: {len(losses)} logged steps < {LOSS_GATE_MIN_STEPS} "
                "(training.loss_falling_gate: true checks short runs too)",
            )
        )
        return gates
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    gates.append(
        Gate(
            "loss_falling",
            last < first and len(losses) >= 2,
            f"mean of first {k} steps {first:.4f} -> last {k} steps {last:.4f}"
            + ("" if last < first else " (training.loss_falling_gate: false switches this gate off)"),
        )
    )
    return gates


def save_result(trainer: Any, stage_dir: Path, stage_cfg: StageTrainingConfig) -> str:
    """The stage's result: `adapter/` for LoRA methods, `model/` (whole weights) for full and freeze."""
    name = "adapter" if stage_cfg.method in ("lora", "qlora") else "model"
    other = stage_dir / ("model" if name == "adapter" else "adapter")
    if is_main() and other.exists():
        shutil.rmtree(other)  # a result of another method would be taken for this one
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        _save_sharded(trainer, stage_dir / name)
    else:
        save_adapter(trainer.model, stage_dir / name)
    return f"{stage_dir.name}/{name}"


def _save_sharded(trainer: Any, dest: Path) -> None:
    """FSDP / ZeRO: the weights are spread over the processes, so every process takes part in the
    save (the trainer gathers them to the main one); the main one writes a temp folder and renames."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    sharding.before_final_save(trainer)
    trainer.save_model(str(tmp))
    _barrier()
    if is_main():
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)


def save_adapter(model: Any, dest: Path) -> None:
    """Write to a temp folder and rename, so an interrupted save never looks like a finished adapter."""
    if not is_main():
        return
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[-1])


def resume_point(stage_dir: Path, fingerprint: str, log: Any = print) -> Path | None:
    """The newest complete, intact checkpoint of this stage under the same inputs, or None.

    Checkpoints made under other inputs (config, data, code) are removed: resuming them would mix two
    runs. Checkpoints without the completion marker were interrupted mid-save and are removed too.
    A complete one that fails `CheckpointMarker.verify` (a file changed since the save, a broken
    trainer_state.json) is moved aside, not deleted, and the next older one is tried."""
    ckdir = stage_dir / "checkpoints"
    stamp = ckdir / "fingerprint.txt"
    main = is_main()  # under DDP every process reads; only the main one cleans up
    if ckdir.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        log(f"checkpoints in {ckdir} were made with other inputs: starting over")
        if main:
            shutil.rmtree(ckdir, ignore_errors=True)
    same_inputs = stamp.is_file() and stamp.read_text() == fingerprint
    for d in checkpoint_dirs(ckdir) if same_inputs else []:
        if not (d / COMPLETE).is_file():
            log(f"ignoring {d.name}: interrupted while being saved")
            if main:
                shutil.rmtree(d, ignore_errors=True)
    ckdir.mkdir(parents=True, exist_ok=True)
    if main:
        stamp.write_text(fingerprint)
    complete = _complete_checkpoints(ckdir) if same_inputs else []
    for i, d in enumerate(complete):
        problem = CheckpointMarker.verify(d)
        if problem is None:
            return d
        log(_set_aside(d, f"is corrupt ({problem})", complete[i + 1 :]))
    return None


def _complete_checkpoints(ckdir: Path) -> list[Path]:
    """The checkpoints with a completion marker, newest first."""
    return [d for d in reversed(checkpoint_dirs(ckdir)) if (d / COMPLETE).is_file()]


def _set_aside(ckpt: Path, problem: str, older: list[Path]) -> str:
    """Move a checkpoint that cannot be resumed to `corrupt-checkpoint-N` beside it: kept for a look,
    outside the `checkpoint-*` names that resume and the trainer read. Returns the line to log."""
    aside = ckpt.with_name(f"corrupt-{ckpt.name}")
    n = 1
    while aside.exists():  # the same step went bad before
        n += 1
        aside = ckpt.with_name(f"corrupt-{ckpt.name}.{n}")
    if is_main():
        ckpt.rename(aside)
    stage = ckpt.parent.parent.name
    then = (
        f"falling back to {older[0].name}"
        if older
        else f"no complete checkpoint left: {stage} starts over from step 0"
    )
    return f"{stage}: {ckpt.name} {problem}; moved it to {ckpt.parent.name}/{aside.name}, {then}"


# Where a checkpoint's bytes are parsed: an error raised in these while a frame holds one of the
# checkpoint's files is that file's fault (truncated, garbage), not the training's.
_READERS = ("torch/serialization.py", "torch/_weights_only_unpickler.py", "/safetensors/", "/json/")


def _posix(path: str) -> str:
    return path.replace(os.sep, "/")


def _unreadable_file(e: BaseException, ckpt: Path) -> str | None:
    """The file and error ("<file>: <error>") when `e` was raised reading a file of `ckpt` (torch.load,
    pickle, safetensors or json, called by the trainer while loading the checkpoint), else None.

    The file is the one a frame of the traceback was reading (torch.load's `f`, safetensors'
    `filename`, TrainerState.load_from_json's `json_path`): the error messages do not name it."""
    if not isinstance(e, Exception):
        return None
    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    is_reader = [any(r in _posix(f.f_code.co_filename) for r in _READERS) for f in frames]
    reader = next((i for i, yes in enumerate(is_reader) if yes), None)
    if reader is None:
        return None
    # The file is held by the reader (torch.load's `f`) or by its caller (load_from_json's `json_path`).
    roots = {os.path.join(os.path.normpath(r), "") for r in (str(ckpt), str(ckpt.resolve()))}
    file = None
    for frame in frames[max(reader - 1, 0) :]:
        for value in list(frame.f_locals.values()):
            path = value if isinstance(value, str) else os.fspath(value) if isinstance(value, Path) else None
            if not path or len(path) > 4096:  # not a path (json.loads' text, say)
                continue
            path = os.path.normpath(path)
            root = next((r for r in roots if path.startswith(r)), None)
            if root and os.path.isfile(path):
                file = path[len(root) :]  # the innermost frame's wins: the file being parsed
    if file is None:
        return None
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch wraps the parse error in a weights_only explanation
        text = text.split("WeightsUnpickler error:", 1)[1]
    detail = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{file}: {type(e).__name__}" + (f": {detail[:200]}" if detail else "")


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


class OutOfMemory(Exception):
    """Out of memory even at micro-batch 1: the message lists what else reduces memory."""


class Training:
    """The callbacks every training stage uses, and the run with resume, OOM recovery and exit 75.

    A stage hands `run` a function building its TRL trainer for a (micro-batch, accumulation) pair
    with `self.callbacks`; on out-of-memory the batch is halved and accumulation doubled (the same
    effective batch) and training continues from the newest complete checkpoint."""

    def __init__(self, ctx: StageContext, stage: str, stage_dir: Path):
        self.ctx, self.stage, self.stage_dir = ctx, stage, stage_dir
        self.stop = StopRequest(ctx.deadline, SAVE_MARGIN_S, ctx.stop_file)
        self.batch_changes: list[str] = list(ctx.batch_changes)  # a relaunch after OOM carries them
        self._said_engine = False
        self._prepare()

    def _prepare(self) -> None:
        self.resume = resume_point(self.stage_dir, self.ctx.fingerprint, self.ctx.log)
        self.resume_step = _step_of(self.resume) if self.resume else 0
        self.log_cb = JsonlLogCallback(self.stage_dir / "log.jsonl", self.resume_step)
        self.callbacks = [
            self.log_cb,
            CheckpointMarker(self.stage, self.ctx.fingerprint, self.ctx.cfg.training.save_total_limit),
            self.stop,
            FaultInjector(self.stage),
            # Budget left: the whole run's deadline; a context without one (built by hand) has the stage's.
            ConsoleProgress(
                self.stage, self.ctx.budget_end or self.ctx.deadline, shown=_headline(self.stage)
            ),
        ]

    def _check_losses(self, trainer: Any) -> None:
        _check_losses_of(trainer, self.stage)

    def _planned_start(self, batch: int, accum: int) -> tuple[int, int]:
        """On a CUDA GPU, start from the largest micro-batch the memory planner expects to fit (same
        effective batch) instead of learning it from an OOM and a restart. CPU and smoke runs: unchanged.
        The halving on OOM in `run` still catches what the estimate misses."""
        import torch

        if not torch.cuda.is_available() or self.ctx.smoke:
            return batch, accum
        from .modeling import local_rank
        from .planner import PlannerError, starting_batch

        total = torch.cuda.get_device_properties(local_rank()).total_memory
        try:
            planned, _ = starting_batch(self.ctx.cfg, self.stage, total, device="cuda")  # type: ignore[arg-type]
        except PlannerError:
            return batch, accum
        if planned >= batch or batch % planned:
            return batch, accum
        change = (
            f"memory planner: micro-batch {batch} -> {planned}, gradient accumulation {accum} -> "
            f"{accum * batch // planned} (the estimated peak at {batch} is above {total / 2**30:.0f} GiB)"
        )
        self.batch_changes.append(change)
        self.ctx.log(f"{self.stage}: {change}")
        return planned, accum * batch // planned

    def run(self, build: Callable[[int, int], Any], batch: int, accum: int) -> Any:
        section: StageTrainingConfig = getattr(self.ctx.cfg, self.stage)
        # Open for trainer construction too: a DPO trainer precomputing reference log-probs scores then.
        with lm_head_on_loss_positions(section.lm_head_loss_positions_only, self.ctx.log) as compact:
            if compact:
                self.ctx.log(f"{self.stage}: LM head projects only the loss-bearing positions")
            return self._run(build, batch, accum)

    def _run(self, build: Callable[[int, int], Any], batch: int, accum: int) -> Any:
        # Relaunched after an out-of-memory in a process group: the launcher says where to start.
        batch, accum = self.ctx.micro_batch or self._planned_start(batch, accum)
        unloadable: set[Path] = set()  # checkpoints whose files failed to load, set aside
        while True:
            trainer = None
            self.stop.install_signal_handlers()
            try:
                # Inside the OOM guard: a DPO trainer precomputing reference log-probs runs the model here.
                trainer = build(batch, accum)
                sharding.prepare_trainer(trainer)  # FSDP2 on CPU processes: accelerate alone trains DDP
                if world_size() > 1 and not self._said_engine:
                    self._said_engine = True
                    engine = (
                        "FSDP2"
                        if getattr(trainer, "is_fsdp_enabled", False)
                        else "DeepSpeed"
                        if getattr(trainer, "is_deepspeed_enabled", False)
                        else "DDP"
                    )
                    self.ctx.log(f"{self.stage}: {world_size()} processes, {engine}")
                remove_library_printers(trainer)  # ConsoleProgress (in self.callbacks) prints the steps
                self._check_losses(trainer)
                if self.resume:
                    self.ctx.log(f"{self.stage}: resuming from {self.resume.name} (step {self.resume_step})")
                finished = _finished_checkpoint(self.resume, sharding.resolve(self.ctx.cfg).kind)
                if finished is not None:
                    # Saved at the last step (stopped before the stage finished): the weights are final.
                    # trainer.train would still run one more step before it checks max_steps.
                    self.ctx.log(f"{self.stage}: {self.resume.name} is the last step; training is done")
                    result = finished(trainer)
                else:
                    result = trainer.train(resume_from_checkpoint=str(self.resume) if self.resume else None)
                self.trainer = trainer
                break
            except NonFiniteLoss as e:
                ckpt = resume_point(self.stage_dir, self.ctx.fingerprint, self.ctx.log)
                raise GateFailed(
                    f"[{self.stage}] loss is {e.value} at step {e.step}"
                    + (" in another process" if e.elsewhere else "")
                    + (
                        ": every process stopped there. "
                        if world_size() > 1
                        else ": training stopped there. "
                    )
                    + (
                        f"The last complete checkpoint is {ckpt.name}. "
                        if ckpt
                        else "No checkpoint was saved. "
                    )
                    + "Try a lower learning_rate, max_grad_norm, bf16 instead of fp16, or check the data."
                ) from None
            except BaseException as e:
                bad = self.resume
                problem = _unreadable_file(e, bad) if bad and not is_oom(e) else None
                if bad is not None and problem is not None:
                    # Verified, yet torch/safetensors/json cannot read a file of it (a marker without a
                    # manifest, a file too big to hash): set it aside and resume from the one before.
                    # Bounded: each pass moves one checkpoint away, and one that stays put is raised.
                    if bad in unloadable:
                        raise
                    unloadable.add(bad)
                    trainer = None
                    _free_memory()
                    older = [d for d in _complete_checkpoints(bad.parent) if _step_of(d) < _step_of(bad)]
                    self.ctx.log(_set_aside(bad, f"could not be loaded ({problem})", older))
                    _barrier()  # every process lists the checkpoints again after the main one moved it
                    self._prepare()
                    continue
                if not is_oom(e):
                    raise
                where = (
                    f"at step {trainer.state.global_step}"
                    if trainer is not None
                    else "while building the trainer (reference log-probs)"
                )
                trainer = None
                _free_memory()
                # The smallest micro-batch the stage's trainer takes (KTO: 2, for its KL estimate).
                from .stages import registry

                floor = registry.get(self.stage).min_micro_batch
                if batch // 2 >= floor and world_size() > 1:
                    # The other processes wait in a collective for this one: they cannot halve in step
                    # here. The launcher relaunches every process at half the micro-batch.
                    from .launch import GroupOutOfMemory

                    raise GroupOutOfMemory(where, batch, accum) from None
                if batch // 2 < floor:
                    raise OutOfMemory(
                        f"[{self.stage}] out of memory {where} even with micro-batch {batch}"
                        + (f" (the smallest {self.stage} takes)" if floor > 1 else "")
                        + ". Options: "
                        "method: qlora (model.load_in_4bit: true), a shorter data.max_length, "
                        "gradient_checkpointing: true, fewer lora.target_modules, or a smaller model"
                    ) from None
                batch, accum = batch // 2, accum * 2
                change = (
                    f"out of memory {where}: micro-batch {batch * 2} -> {batch}, gradient "
                    f"accumulation {accum // 2} -> {accum} (same effective batch)"
                )
                self.batch_changes.append(change)
                self.ctx.log(f"{self.stage}: {change}; continuing from the newest complete checkpoint")
                self._prepare()
            finally:
                self.stop.restore_signal_handlers()
        self.batch, self.accum = batch, accum
        if self.stop.reason:
            raise StageStopped(
                f"[{self.stage}] stopped at step {trainer.state.global_step} ({self.stop.reason}) with a "
                "complete checkpoint; run the same command again to resume"
            )
        return result


def _finished_checkpoint(ckpt: Path | None, sharding: str) -> Callable[[Any], Any] | None:
    """For a checkpoint saved at the run's last step (its trainer_state says global_step >= max_steps),
    a function loading it into a trainer and returning the trainer's TrainOutput; else None. Under
    FSDP / ZeRO the trainer's own resume loads the sharded state (and trains that one step again)."""
    if ckpt is None or sharding != "ddp":
        return None
    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    if not saved.get("max_steps") or saved.get("global_step", 0) < saved["max_steps"]:
        return None

    def load(trainer: Any) -> Any:
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        trainer._load_from_checkpoint(str(ckpt))
        trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return TrainOutput(trainer.state.global_step, losses[-1] if losses else 0.0, {"train_runtime": 0.0})

    return load


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float, elsewhere: bool = False):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step, self.value, self.elsewhere = step, value, elsewhere


def _check_losses_of(trainer: Any, stage: str) -> None:
    """Wrap the trainer's compute_loss: a NaN/inf loss stops training in the step it appears, before
    the optimizer applies it (the trainer's own logging would average it away or report it later)."""
    import torch

    compute = trainer.compute_loss

    def checked(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = compute(model, inputs, *args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        step = trainer.state.global_step + 1
        if fault("nan", stage) == step:  # test hook
            loss = loss * float("nan")
            out = (loss, *out[1:]) if isinstance(out, tuple) else loss
        finite = bool(torch.isfinite(loss.detach()).all())
        # Every process learns of a NaN on any one: all stop at this step (one rank stopping alone
        # would leave the others waiting in the gradient all-reduce).
        if not agree_all(finite):
            # Finite here, not on another process: that one's value is not known here, only that.
            value = float(loss.detach().float().mean()) if not finite else float("nan")
            raise NonFiniteLoss(step, value, elsewhere=finite)
        return out

    trainer.compute_loss = checked


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _headline(stage: str) -> tuple[tuple[str, str], ...]:
    """The stage's first registered curve, shown on its console line after the loss."""
    from .stages import registry

    curves = registry.get(stage).curves if registry.is_training_stage(stage) else ()
    return tuple((c.key, c.label) for c in curves[:1])


def starting_model(ctx: StageContext, stage: str, plan: Plan) -> Any:
    """A fresh copy of the model stage `stage` trains: the previous trained stage's result in pipeline
    order (the base model for the first), with fused kernels, and frozen layers for method freeze."""
    from .modeling import apply_fused_kernels, freeze_all_but_last_layers, load_stage_model
    from .stages import registry

    cfg, section = ctx.cfg, ctx.cfg.stage(stage)
    model = load_stage_model(cfg, plan, ctx.run_dir, registry.previous(cfg, stage) or "base", log=ctx.log)
    apply_fused_kernels(model, cfg, plan, log=ctx.log)
    if section.method == "freeze":
        n = freeze_all_but_last_layers(model, section.freeze_trainable_layers)
        ctx.log(
            f"{stage}: method freeze: {n:,} trainable parameters "
            f"(last {section.freeze_trainable_layers} layers)"
        )
    return model


def frozen_starting_model(ctx: StageContext, stage: str, plan: Plan) -> Any:
    """The model `stage` starts from, frozen: the reference policy where no adapter can be disabled
    (methods full and freeze)."""
    ref = starting_model(ctx, stage, plan).eval()
    for p in ref.parameters():
        p.requires_grad = False
    return ref


def run_trainer_stage(
    ctx: StageContext,
    stage: str,
    train: Any,
    described: str,
    *,
    config_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: Callable[[Plan], dict[str, Any]] | None = None,
    model: Callable[[Plan], Any] | None = None,
    after_build: Callable[[Any, Plan], None] | None = None,
    outputs: dict[str, Any] | None = None,
) -> StageResult:
    """Train registered stage `stage` with its TRL trainer on `train` (a datasets.Dataset).

    config_kwargs: the stage's own keywords for TRL's config class (they may override the shared
    trainer_args, except the micro-batch and accumulation, which the OOM guard owns); trainer_kwargs:
    the trainer's extra keywords, built again for every (re)build (a reference model, reward
    functions); model: a fresh model per build (default: starting_model); after_build: adjusts the
    built trainer (a collator). The trainer is built again after an out-of-memory, with a halved
    micro-batch."""
    from . import compat
    from .dist import world_size
    from .modeling import load_tokenizer, lora_config, plan_for, uses_lora
    from .stages import registry

    spec = registry.get(stage)
    config_cls, trainer_cls = spec.trainer_classes()
    cfg, out, section = ctx.cfg, ctx.stage_dir(stage), ctx.cfg.stage(stage)
    plan = plan_for(cfg.model)
    ctx.log(f"{stage}: {described}; {plan.reason}; attention: {plan.attn_reason}")
    start = registry.previous(cfg, stage)
    ctx.log(f"{stage}: starts from " + (f"the {registry.title(start)} result" if start else "the base model"))
    tok = load_tokenizer(cfg, log=ctx.log)
    base_args = trainer_args(cfg, stage, out, plan, config_cls, ctx.smoke)
    if "max_length" not in getattr(config_cls, "__dataclass_fields__", {"max_length": None}):
        # GRPOConfig has none: the data stage already keeps every prompt within data.max_length.
        base_args.pop("max_length")
    training = Training(ctx, stage, out)
    fresh_model = model or (lambda p: starting_model(ctx, stage, p))

    def build(batch: int, accum: int) -> Any:
        args = compat.build(
            config_cls,
            log=ctx.log,
            **{
                **base_args,
                **(config_kwargs or {}),
                "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": accum,
            },
        )
        trainer = compat.build(
            trainer_cls,
            log=ctx.log,
            model=fresh_model(plan),
            args=args,
            train_dataset=train,
            processing_class=tok,
            peft_config=lora_config(section) if uses_lora(section) else None,
            callbacks=training.callbacks,
            **(trainer_kwargs(plan) if trainer_kwargs else {}),
        )
        if after_build is not None:
            after_build(trainer, plan)
        trackers.attach(trainer, cfg, ctx.log)  # after the trackers' own callbacks: their runs are open
        return trainer

    with trackers.reporting(cfg, stage, ctx.run_dir, ctx.log):
        result = training.run(
            build, base_args["per_device_train_batch_size"], base_args["gradient_accumulation_steps"]
        )
    saved = save_result(training.trainer, out, section)

    log_rows = read_log(out / "log.jsonl")
    falling = cfg.training.loss_falling_gate if spec.loss_falls and not ctx.smoke else False
    gates = loss_gate(log_rows, falling)
    losses = [r["loss"] for r in log_rows if "loss" in r]
    summary = f"{result.global_step} steps" + (
        f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    )
    for curve in spec.curves[:1]:
        values = [r[curve.key] for r in log_rows if curve.key in r]
        if values and losses:
            summary += f", {curve.label} {values[0]:.3f} -> {values[-1]:.3f}"
    return StageResult(
        summary=summary,
        gates=gates,
        outputs={
            "result": saved,
            "starts_from": start or "base",
            "steps": result.global_step,
            "per_device_train_batch_size": training.batch,
            "gradient_accumulation_steps": training.accum,
            "batch_changes": training.batch_changes,
            "world_size": world_size(),
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
            **(outputs or {}),
        },
    )

"""``TrainerCallback``s that record what ``optlora finetune`` reports per step.

* :class:`StepRecorder` -- per optimizer step: training loss, learning rate and gradient norm
  (from the Trainer's logs, ``logging_steps=1``), wall time and process CPU time of the step
  (``on_step_begin`` -> ``on_step_end``: forward, backward, clipping, optimizer + method step,
  scheduler; batch collation happens before ``on_step_begin`` and is not included), seconds since
  training started, and memory: CUDA ``max_memory_allocated``, or on the CPU the process's peak
  resident set size sampled after every step (psutil). A non-finite loss stops training. Its
  records are saved with every Trainer checkpoint (``optlora_steps.json``) and read back when the
  Trainer resumes from one, so a resumed run keeps the steps before the interruption.
* :class:`TelemetryCallback` -- for LoRA-family runs: the numerical rank of the accumulated update
  every ``every`` steps (:class:`~optlora_experiments.telemetry.UpdateRankTracker`), and on every
  step the optlora method acted on, ScaLoRA's column-scaling fraction and the fraction of layers
  the method skipped (``len(method.stats()['last_skipped_layers']) / layers``). It runs after
  :class:`StepRecorder` in ``on_step_end``, so its cost is outside the step time.
* :class:`QuietProgress` -- the Trainer's tqdm bar, showing the loss instead of printing every log line.
* :class:`Heartbeat` -- without a bar (``--no-progress``, or no terminal): a line at least every
  :data:`HEARTBEAT_S` seconds of training or evaluation, so a long run is never silent.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .telemetry import column_fraction, rss_mb, trim_memory

STEPS_FILE = "optlora_steps.json"
#: a line after the first step that ends this long after the last line: at most 30 s apart while steps take < 10 s
HEARTBEAT_S = 20.0


class StepRecorder(TrainerCallback):
    """Collects one dict per optimizer step in :attr:`steps` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.steps: list[dict] = []
        self.rss0 = self.peak_rss = math.nan
        self.diverged_at: int | None = None
        self._t_start = self._t0 = self._c0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        trim_memory()
        self.rss0 = self.peak_rss = rss_mb()
        self._t_start = time.perf_counter()
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STEPS_FILE)
        if state.global_step > 0 and os.path.isfile(saved):  # resumed: keep the steps before the checkpoint
            with open(saved, encoding="utf-8") as fh:
                self.steps = [s for s in json.load(fh) if s["step"] <= state.global_step]
            self._t_start -= self.steps[-1]["wall_time"] if self.steps else 0.0
        return control

    def on_save(self, args, state, control, **kwargs):
        if getattr(args, "should_save", True):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, STEPS_FILE), "w", encoding="utf-8") as fh:
                json.dump(self.steps, fh)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now, cpu = time.perf_counter(), time.process_time()
        self.peak_rss = max(self.peak_rss, rss_mb())
        self.steps.append(
            {
                "step": state.global_step,
                "wall_time": now - self._t_start,
                "step_ms": 1000 * (now - self._t0),
                "cpu_ms": 1000 * (cpu - self._c0),
            }
        )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not self.steps or self.steps[-1]["step"] != state.global_step:
            return control
        entry = self.steps[-1]
        entry["loss"] = float(logs["loss"])
        for src, dst in (("learning_rate", "lr"), ("grad_norm", "grad_norm")):
            if logs.get(src) is not None:
                entry[dst] = float(logs[src])
        if not math.isfinite(entry["loss"]) and self.diverged_at is None:
            self.diverged_at = state.global_step
            control.should_training_stop = True
        return control

    def summary(self) -> dict:
        """``ms_per_step`` / ``cpu_ms_per_step`` (mean over steps 2.., the first pays one-time costs), memory."""
        timed = self.steps[1:] or self.steps
        n = max(len(timed), 1)
        cuda = self.device.type == "cuda"
        return {
            "ms_per_step": sum(s["step_ms"] for s in timed) / n if timed else None,
            "cpu_ms_per_step": sum(s["cpu_ms"] for s in timed) / n if timed else None,
            "peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else self.peak_rss,
            "memory_delta_mb": None if cuda else self.peak_rss - self.rss0,
            "train_wall_s": self.steps[-1]["wall_time"] if self.steps else 0.0,
            "diverged_at_step": self.diverged_at,
        }


class TelemetryCallback(TrainerCallback):
    """Adds rank / column-fraction / skipped-fraction entries to the :class:`StepRecorder`'s steps."""

    def __init__(self, recorder: StepRecorder, method=None, tracker=None, every: int = 0):
        self.recorder, self.method, self.tracker, self.every = recorder, method, tracker, every
        self._last_method_steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        if not self.recorder.steps:
            return control
        entry = self.recorder.steps[-1]
        m = self.method
        if m is not None and m.method_steps > self._last_method_steps:  # the method acted on this step
            self._last_method_steps = m.method_steps
            stats = m.stats()
            if "last_skipped_layers" in stats:
                entry["skipped_fraction"] = len(stats["last_skipped_layers"]) / max(1, stats["layers"])
            cf = column_fraction(m)
            if cf is not None:
                entry["column_fraction"] = cf
        if self.tracker is not None and self.every > 0:
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                entry.update(self.tracker.summary())
        return control


class QuietProgress(ProgressCallback):
    """tqdm progress with the latest loss as postfix, instead of one printed line per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


class Heartbeat(TrainerCallback):
    """Prints the step and the last logged loss when :data:`HEARTBEAT_S` seconds have passed since the last line."""

    def __init__(self, every: float = HEARTBEAT_S, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.last = clock()

    def _due(self) -> bool:
        now = self.clock()
        if now - self.last < self.every:
            return False
        self.last = now
        return True

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self._due():
            loss = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None)
            shown = f", loss {loss:.4f}" if loss is not None else ""
            print(f"  step {state.global_step}/{state.max_steps}{shown}", flush=True)
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._due():
            print("  evaluating ...", flush=True)
        return control

"""Where a training step's time goes, per module type: forward, backward and Opacus's per-sample work.

    timer = LayerTimer(model, optimizer)   # after make_private: model may be Opacus-wrapped
    with timer:                            # hooks installed inside the block only
        ... training steps ...
    timer.table(steps)                     # rows of ms per step, largest first

Per module type (over leaf modules: Linear, Embedding, LayerNorm, Conv2d, GroupNorm, SiLU, ...; the
attention itself is functional (F.scaled_dot_product_attention) and counts in "rest"):
  forward     the module's own forward (between its forward pre-hook and forward hook; under Opacus it
              includes the activation capture)
  backward    from its full backward pre-hook to its full backward hook: the gradients of its inputs
              and parameters, plus Opacus's per-sample hook; under ghost clipping both backward passes
  per-sample  Opacus's per-sample gradient (hooks) or per-sample norm (ghost) function for that type,
              timed by wrapping the functions the wrapped module looks up at each backward
and per step: the whole forward of the model (loss included), the optimizer step (clip/accumulate,
noise, update) and the rest (the backward call outside the module hooks, the loss wrapper, glue).
Hooks cost time themselves: read the table for shares, and the un-instrumented step for the total.
Autograd may interleave branches, so per-module backward times are close, not exact.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from torch import nn


class LayerTimer:
    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.wrapper = model
        self.model = getattr(model, "_module", model)
        self.optimizer = optimizer
        self.totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: dict[str, int] = defaultdict(int)
        self.phases: dict[str, float] = defaultdict(float)
        self._handles: list = []
        self._restore: list = []
        self._start: dict[tuple[int, str], float] = {}

    # ---- hooks ----------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, what: str) -> None:
        self._start[(id(module), what)] = time.perf_counter()

    def _end(self, module: nn.Module, what: str) -> None:
        t0 = self._start.pop((id(module), what), None)
        if t0 is not None:
            self.totals[type(module).__name__][what] += time.perf_counter() - t0

    def _timed_sampler(self, fn, kind: str):
        def wrapper(layer, activations, backprops):
            t0 = time.perf_counter()
            out = fn(layer, activations, backprops)
            self.totals[kind]["per-sample"] += time.perf_counter() - t0
            return out
        return wrapper

    def __enter__(self) -> "LayerTimer":
        for module in self.model.modules():
            if list(module.children()) or isinstance(module, nn.Dropout):
                continue
            self.counts[type(module).__name__] += 1
            self._handles += [
                module.register_forward_pre_hook(lambda m, a: self._begin(m, "forward")),
                module.register_forward_hook(lambda m, a, o: self._end(m, "forward")),
                module.register_full_backward_pre_hook(lambda m, g: self._begin(m, "backward")),
                module.register_full_backward_hook(lambda m, gi, go: self._end(m, "backward")),
            ]
        root = self.model
        self._handles += [root.register_forward_pre_hook(lambda m, a: self._phase_begin("forward")),
                          root.register_forward_hook(lambda m, a, o: self._phase_end("forward"))]
        for table in ("GRAD_SAMPLERS", "NORM_SAMPLERS"):  # Opacus looks these up on the instance
            samplers = getattr(self.wrapper, table, None)
            if samplers is not None:
                setattr(self.wrapper, table, {t: self._timed_sampler(f, t.__name__) for t, f in samplers.items()})
                self._restore.append(table)
        step = self.optimizer.step

        def timed_step(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.phases["optimizer step"] += time.perf_counter() - t0
        self.optimizer.step = timed_step
        return self

    def _phase_begin(self, what: str) -> None:
        self._start[(0, what)] = time.perf_counter()

    def _phase_end(self, what: str) -> None:
        self.phases[what] += time.perf_counter() - self._start.pop((0, what))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for table in self._restore:
            delattr(self.wrapper, table)  # back to the class's table
        del self.optimizer.step  # back to the class's method

    # ---- report ---------------------------------------------------------------------------------
    def table(self, steps: int, step_seconds: float | None = None) -> dict[str, Any]:
        """{"layers": [{type, count, forward_ms, backward_ms, per_sample_ms}], "phases": {...}} per step."""
        per = 1e3 / max(steps, 1)
        layers = [{"type": name, "count": self.counts.get(name, 0),
                   "forward_ms": t.get("forward", 0.0) * per, "backward_ms": t.get("backward", 0.0) * per,
                   "per_sample_ms": t.get("per-sample", 0.0) * per} for name, t in self.totals.items()]
        layers.sort(key=lambda r: -(r["forward_ms"] + r["backward_ms"]))
        phases = {k: v * per for k, v in self.phases.items()}
        if step_seconds is not None:
            phases["whole step (instrumented)"] = step_seconds * 1e3
            phases["backward (all layers) and rest"] = step_seconds * 1e3 - phases.get("forward", 0) - phases.get(
                "optimizer step", 0)
        return {"layers": layers, "phases": phases}


def format_table(title: str, report: dict[str, Any]) -> str:
    lines = [f"  per layer, {title} (ms per step; backward includes Opacus's per-sample hook):",
             f"    {'module type':16} {'count':>5} {'forward':>9} {'backward':>9} {'per-sample':>11}"]
    for r in report["layers"]:
        lines.append(f"    {r['type']:16} {r['count']:>5} {r['forward_ms']:>9.1f} {r['backward_ms']:>9.1f} "
                     f"{r['per_sample_ms']:>11.1f}")
    lines.append("    " + ", ".join(f"{k} {v:.1f}" for k, v in report["phases"].items()))
    return "\n".join(lines)

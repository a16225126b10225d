"""What firing a hook costs: CallbackList against a direct call, a plain loop and frameworks.

For N = 1, 5 and 20 callbacks, with none, one or all of them overriding the hook, each way
fires one `on_step_end` (or its framework's equivalent) and is timed per call, in the same
run, interleaved:

  direct        one overriding callback's method, called directly
  plain loop    `for m in methods: m(state, step_idx, batch, metrics)` inline, over the
                bound methods of the callbacks that override it (the floor)
  loopbridge    `callbacks.on_step_end(state, step_idx, batch, metrics)` on a CallbackList
  getattr       a dispatcher that does `getattr(callback, hook)(...)` per callback per call
  pluggy        `pm.hook.on_step_end(...)`, one hookimpl per overriding plugin
  transformers  `CallbackHandler.on_step_end(args, state, control)`
  lightning     `_call_callback_hooks(trainer, "on_train_batch_end", ...)` on a Trainer

The frameworks' own callbacks that do not override the hook inherit their no-op, exactly
as in those frameworks; each overriding hook's body is `pass`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopbridge import Callback, CallbackList, LoopState, TrainingBatch
from loopbridge.bench._timing import (
    INSTALL_HINT,
    NOT_INSTALLED,
    Target,
    fmt_ns,
    fmt_ratio,
    format_table,
    interleaved_ns,
    ratio,
    seconds_per_sample,
)

__all__ = ["DispatchResult", "run"]

SIZES = (1, 5, 20)
MODES = ("none", "one", "all")
WAYS = ("direct", "plain loop", "loopbridge", "getattr", "pluggy", "transformers", "lightning")
Case = tuple[str, dict[str, Any]]
Builder = Callable[[int, str], Case]


class _Overrides(Callback):
    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        pass


def _overriding(n: int, mode: str) -> list[bool]:
    """Which of `n` callbacks override the hook: none, the first, or all."""
    return [mode == "all" or (mode == "one" and i == 0) for i in range(n)]


def _hook_args() -> dict[str, Any]:
    state = LoopState(run_name="bench", run_id="bench", max_steps=None, out_dir=Path("."))
    batch = TrainingBatch(index=0, data=None, size=None)
    return {"state": state, "step_idx": 0, "batch": batch, "metrics": {"loss": 0.5}}


def _ours(n: int, mode: str) -> list[Callback]:
    return [_Overrides() if o else Callback() for o in _overriding(n, mode)]


def _direct(n: int, mode: str) -> Case:
    return "cb.on_step_end(state, step_idx, batch, metrics)", {"cb": _Overrides(), **_hook_args()}


def _plain_loop(n: int, mode: str) -> Case:
    methods = tuple(cb.on_step_end for cb in _ours(n, mode) if isinstance(cb, _Overrides))
    stmt = "for m in methods:\n    m(state, step_idx, batch, metrics)"
    return stmt, {"methods": methods, **_hook_args()}


def _loopbridge(n: int, mode: str) -> Case:
    stmt = "callbacks.on_step_end(state, step_idx, batch, metrics)"
    return stmt, {"callbacks": CallbackList(_ours(n, mode)), **_hook_args()}


class GetattrDispatcher:
    """Looks each callback's hook up by name on every call, as transformers and Lightning do."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    def call_event(self, event: str, *args: Any) -> None:
        """Call `event` on every callback."""
        for callback in self.callbacks:
            getattr(callback, event)(*args)


def _getattr(n: int, mode: str) -> Case:
    stmt = "dispatcher.call_event('on_step_end', state, step_idx, batch, metrics)"
    return stmt, {"dispatcher": GetattrDispatcher(_ours(n, mode)), **_hook_args()}


def _pluggy(n: int, mode: str) -> Case:
    import pluggy

    hookspec = pluggy.HookspecMarker("loopbridge_bench")
    hookimpl = pluggy.HookimplMarker("loopbridge_bench")

    class Spec:
        @hookspec
        def on_step_end(
            self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
        ) -> None:
            """The hook, as a pluggy hookspec."""

    class Plugin:
        @hookimpl
        def on_step_end(
            self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
        ) -> None:
            pass

    class Bystander:
        """A plugin with no implementation of the hook."""

    manager = pluggy.PluginManager("loopbridge_bench")
    manager.add_hookspecs(Spec)
    for overrides in _overriding(n, mode):
        manager.register(Plugin() if overrides else Bystander())
    stmt = "hook.on_step_end(state=state, step_idx=step_idx, batch=batch, metrics=metrics)"
    return stmt, {"hook": manager.hook, **_hook_args()}


def _transformers(n: int, mode: str) -> Case:
    with _quiet():
        import transformers
        from transformers.trainer_callback import (
            CallbackHandler,
            TrainerCallback,
            TrainerControl,
            TrainerState,
        )

        transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]

        class Overrides(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                pass

        callbacks = [Overrides() if o else TrainerCallback() for o in _overriding(n, mode)]
        handler = CallbackHandler(callbacks, None, None, None, None)  # type: ignore[no-untyped-call]
    # The handler only passes `args` through; TrainingArguments itself needs accelerate.
    namespace = {"handler": handler, "args": None, "st": TrainerState(), "ctl": TrainerControl()}
    return "handler.on_step_end(args, st, ctl)", namespace


def _lightning(n: int, mode: str) -> Case:
    with _quiet():
        try:
            pl = importlib.import_module("lightning.pytorch")
        except ImportError:
            pl = importlib.import_module("pytorch_lightning")
        call = importlib.import_module(f"{pl.__name__}.trainer.call")
        callback_base: Any = pl.Callback
        module_base: Any = pl.LightningModule

        class Overrides(callback_base):  # type: ignore[misc]
            def on_train_batch_end(
                self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
            ) -> None:
                pass

        class Module(module_base):  # type: ignore[misc]
            """A module with nothing in it: the hook call only sets its current hook name."""

        trainer = pl.Trainer(
            callbacks=[Overrides() if o else callback_base() for o in _overriding(n, mode)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.strategy.connect(Module())
    if len(trainer.callbacks) != n:
        msg = f"the Lightning Trainer has {len(trainer.callbacks)} callbacks, {n} expected"
        raise RuntimeError(msg)
    stmt = "call_hooks(trainer, 'on_train_batch_end', outputs, batch, batch_idx)"
    namespace = {
        "call_hooks": call._call_callback_hooks,
        "trainer": trainer,
        "outputs": None,
        "batch": None,
        "batch_idx": 0,
    }
    return stmt, namespace


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the frameworks' import-time warnings and log lines out of the table."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


_BUILDERS: dict[str, Builder] = {
    "direct": _direct,
    "plain loop": _plain_loop,
    "loopbridge": _loopbridge,
    "getattr": _getattr,
    "pluggy": _pluggy,
    "transformers": _transformers,
    "lightning": _lightning,
}
_OPTIONAL = {"pluggy": "pluggy", "transformers": "transformers", "lightning": "lightning"}


@dataclass
class DispatchResult:
    """Nanoseconds per fired hook for each (N, mode, way); NaN where a way is missing."""

    ns: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    empty_ns: float = float("nan")
    repeat: int = 0

    def targets(self) -> list[Target]:
        """The issue's targets, one per N."""
        out = []
        for n in SIZES:
            none = self.ns[(n, "none")]
            one = self.ns[(n, "one")]
            every = self.ns[(n, "all")]
            out += [
                Target(
                    f"N={n:<2}, none overriding: loopbridge / direct call",
                    ratio(none["loopbridge"], none["direct"]),
                    1.5,
                ),
                Target(
                    f"N={n:<2}, one overriding:  loopbridge / direct call",
                    ratio(one["loopbridge"], one["direct"]),
                    1.5,
                ),
                Target(
                    f"N={n:<2}, all overriding:  loopbridge / plain loop",
                    ratio(every["loopbridge"], every["plain loop"]),
                    1.25,
                ),
            ]
        return out

    def table(self) -> str:
        """The measurements, the ratios to the baselines, and the targets."""
        headers = ("N", "overriding", *WAYS)
        rows = []
        for (n, mode), values in self.ns.items():
            cells = [NOT_INSTALLED if way in self.missing else fmt_ns(values[way]) for way in WAYS]
            rows.append((str(n), mode, *cells))
        baselines = ("getattr", "pluggy", "transformers", "lightning")
        ratio_rows = []
        for (n, mode), values in self.ns.items():
            reference = "plain loop" if mode == "all" else "direct"
            ours = values["loopbridge"]
            cells = [
                NOT_INSTALLED if way in self.missing else fmt_ratio(ratio(values[way], ours))
                for way in baselines
            ]
            loop = self.empty_ns
            net = ratio(ours - loop, values[reference] - loop)
            ratio_rows.append(
                (
                    str(n),
                    mode,
                    fmt_ratio(ratio(ours, values[reference])),
                    fmt_ratio(net),
                    reference,
                    *cells,
                )
            )
        lines = [
            f"dispatch: ns of thread CPU time per fired hook, median of {self.repeat} "
            f"interleaved samples (the timing loop's own {fmt_ns(self.empty_ns)} ns per "
            f"iteration is included, not subtracted)",
            format_table(headers, rows, left=2),
            "",
            "dispatch ratios: loopbridge / its reference (as measured, and net of the timing "
            "loop's cost, shown, not used by the targets), and each baseline / loopbridge",
            format_table(
                (
                    "N",
                    "overriding",
                    "loopbridge",
                    "net",
                    "reference",
                    *(f"{b}/lb" for b in baselines),
                ),
                ratio_rows,
                left=2,
            ),
        ]
        for way, why in self.missing.items():
            lines.append(f"{way}: {why}")
        lines += ["", "dispatch targets:", *(t.line() for t in self.targets())]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The results as plain data."""
        return {
            "unit": "ns of thread CPU time per fired hook",
            "repeat": self.repeat,
            "timing_loop_ns": self.empty_ns,
            "rows": [
                {
                    "n": n,
                    "overriding": mode,
                    **{way: (None if way in self.missing else v) for way, v in values.items()},
                }
                for (n, mode), values in self.ns.items()
            ],
            "missing": self.missing,
            "targets": [t.to_json() for t in self.targets()],
        }


def _available() -> dict[str, str]:
    """The optional baselines that cannot be imported, with why."""
    missing = {}
    for way, module in _OPTIONAL.items():
        found = importlib.util.find_spec(module) is not None
        if way == "lightning" and not found:
            found = importlib.util.find_spec("pytorch_lightning") is not None
        if not found:
            missing[way] = f"{NOT_INSTALLED}: {INSTALL_HINT}"
    return missing


def run(*, full: bool = False, progress: Callable[[str], None] | None = None) -> DispatchResult:
    """Measure every way for every (N, mode)."""
    repeat = 41 if full else 15
    sample_s = seconds_per_sample(full=full)
    result = DispatchResult(missing=_available(), repeat=repeat)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # Lightning writes here
        for n in SIZES:
            for mode in MODES:
                if progress is not None:
                    progress(f"dispatch N={n} {mode}")
                cases: dict[str, Case] = {}
                for way in WAYS:
                    if way in result.missing:
                        continue
                    try:
                        cases[way] = _BUILDERS[way](n, mode)
                    except ImportError as exc:
                        result.missing[way] = f"{NOT_INSTALLED} ({exc}): {INSTALL_HINT}"
                if (n, mode) == (SIZES[0], MODES[0]):
                    cases["(timing loop)"] = ("pass", {})
                measured = interleaved_ns(cases, repeat=repeat, sample_s=sample_s)
                result.empty_ns = measured.pop("(timing loop)", result.empty_ns)
                result.ns[(n, mode)] = {way: measured.get(way, float("nan")) for way in WAYS}
    return result

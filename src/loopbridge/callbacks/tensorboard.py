"""TensorBoardLogger: step metrics, evals, benchmarks and the run config as TensorBoard event files.

Layout, one event-file directory per run::

    <log_dir>/<experiment>/<run name>/events.out.tfevents.<time>.<host>.<pid>.0   (Experiment)
    <log_dir>/<run name>/events.out.tfevents...                                    (TrainLoop)

A directory that already holds event files (the same experiment run again) gets a suffix,
`<run name>.2`, `.3`..., so that TensorBoard does not merge two runs into one. Point TensorBoard
at `<log_dir>` (every experiment) or `<log_dir>/<experiment>`.

Tags: step metrics as given, at step `state.step` (steps completed); evals as
`eval/<name>/<metric>`; benchmarks as `bench/<name>/<metric>` and
`bench/<name>/<slice>/<metric>` (post-training ones at the run's last step), their tags as a
text summary `bench/<name>/tags`. Scalars are float32 (`simple_value`), as every TensorBoard
writer stores them; NaN stays NaN. The run config goes to the hparams plugin as flattened
dotted keys; each run is one session, and the repeats of an arm share a session group
(`<experiment>/<arm>`), so the HParams table shows an arm's runs together. Each run ends with
the plugin's session-end record: STATUS_SUCCESS, or STATUS_FAILURE for a run that failed.

Why tensorboard's own writer rather than tensorboardX: `tensorboard.summary.writer` is the
maintained writer that TensorBoard's team ships (PyTorch's `SummaryWriter` is built on it),
and the hparams plugin's `summary_v2.hparams_pb` builds the session record without
TensorFlow. The one `tensorboard` package then writes and reads (`EventAccumulator`) what
users view with it. tensorboardX would add a second dependency whose `add_hparams` writes the
hparams into a separate timestamped sub-directory, splitting each run in two in TensorBoard;
tensorboard's experimental `tensorboard.summary.Writer` has no hparams or text yet.

Two costs of that writer, measured (benchmarks/bench_loggers.py) because the writing shares
the GIL with the training thread: `EventFileWriter` hands every event to a queue thread of its
own, which tripled the time per 10-metric row (about 68 against 21 µs here), so events go
through its `RecordWriter` (the record framing and checksums) from the worker thread that
already writes off the training thread; the file name and the leading version record are
the ones `EventFileWriter` writes. And its CRC-32C is pure Python, about 60 µs per event; the
extra also installs google-crc32c, whose C checksum the record writer is given (same bytes).

The loop thread only appends rows; writing happens in a worker thread spawned from the
bridge, one run at a time in hook order, and a run's file is flushed and closed by the time
the run's drain returns. Needs the `tensorboard` extra: `pip install 'loopbridge[tensorboard]'`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from loopbridge._exceptions import MissingExtraError
from loopbridge._types import EvalResult
from loopbridge.callbacks._run_logger import Row, RunEnd, RunLogger, RunSink, flat_config, numbers

__all__ = ["TensorBoardLogger"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[\\/\x00]")
_file_ids = itertools.count()


def _import_tensorboard() -> Any:
    """The modules this logger writes with, or an error naming the extra."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from tensorboard.plugins.hparams import metadata as hparams_metadata
        from tensorboard.plugins.hparams import summary_v2 as hparams_summary
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer import record_writer
        from tensorboard.util import tensor_util
    except ImportError as exc:
        msg = (
            "TensorBoardLogger needs tensorboard: install loopbridge[tensorboard] "
            "(pip install 'loopbridge[tensorboard]')"
        )
        raise MissingExtraError(msg) from exc

    _use_fast_crc(record_writer)

    class Modules:
        pass

    modules: Any = Modules()
    modules.event_pb2 = event_pb2
    modules.summary_pb2 = summary_pb2
    modules.api_pb2 = api_pb2
    modules.plugin_data_pb2 = plugin_data_pb2
    modules.hparams_metadata = hparams_metadata
    modules.hparams_summary = hparams_summary
    modules.text_metadata = text_metadata
    modules.RecordWriter = record_writer.RecordWriter
    modules.tensor_util = tensor_util
    return modules


def _use_fast_crc(record_writer: Any) -> None:
    """Give tensorboard's record writer a C CRC-32C (google-crc32c) when it is installed.

    Its own is pure Python, about 60 µs for a 300-byte event here, and it runs under the
    GIL, so the training thread paid for it; the checksums are the same.
    """
    try:
        import google_crc32c
    except ImportError:
        return
    if google_crc32c.implementation != "c":
        return
    value = google_crc32c.value

    def masked_crc32c(data: bytes) -> int:
        x = int(value(data))
        return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    record_writer.masked_crc32c = masked_crc32c


class _EventFile:
    """One event file, written through tensorboard's RecordWriter by the calling thread."""

    def __init__(self, tb: Any, directory: Path) -> None:
        # The name and first record EventFileWriter gives a file, so readers see no difference.
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_file_ids)}"
        )
        self.path = directory / name
        self._records = tb.RecordWriter(self.path.open("wb"))
        version = tb.event_pb2.Event(
            wall_time=time.time(),
            file_version="brain.Event:2",
            source_metadata=tb.event_pb2.SourceMetadata(writer="loopbridge"),
        )
        self.add_event(version)

    def add_event(self, event: Any) -> None:
        """Append one Event record (buffered until `flush`)."""
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        """Hand what is buffered to the operating system."""
        self._records.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._records.close()


def _segment(name: str) -> str:
    """A name made safe as one directory name."""
    safe = _UNSAFE.sub("_", name).strip() or "run"
    return "_" + safe if safe in {".", ".."} else safe


class TensorBoardLogger(RunLogger):
    """Writes each run's metrics, evals, benchmarks and config to TensorBoard event files.

    Args:
        log_dir: the root of the event-file directories; `runs` (in the working directory)
            if None, as PyTorch's SummaryWriter does.
        flush_interval_s: rows are handed to the writer at least this often, and the event
            file is flushed to disk as often.
        flush_rows: rows buffered on the loop thread before they are handed over at once.
    """

    source = "TensorBoardLogger"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        flush_interval_s: float = 2.0,
        flush_rows: int = 1000,
    ) -> None:
        super().__init__(flush_interval_s=flush_interval_s, flush_rows=flush_rows)
        self._tb: Any = None
        self.log_dir = Path("runs" if log_dir is None else log_dir)
        self.run_dirs: list[Path] = []
        """The event-file directory of every run opened so far, in order."""

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.log_dir)!r})"

    def _start(self, *, owns: bool, **fields: Any) -> RunSink:
        # Import on the loop thread at run start, so a missing extra fails the run at once.
        if self._tb is None:
            self._tb = _import_tensorboard()
        return super()._start(owns=owns, **fields)

    def _run_dir(self, run: RunSink) -> Path:
        parent = self.log_dir
        if run.experiment is not None:
            parent = parent / _segment(run.experiment)
        base = _segment(run.name)
        path, n = parent / base, 1
        while path.is_dir() and any(
            p.name.startswith("events.out.tfevents") for p in path.iterdir()
        ):
            n += 1
            path = parent / f"{base}.{n}"
        return path

    # ------------------------------------------------------------------ bridge loop

    async def _open(self, run: RunSink) -> None:
        run.handle = await asyncio.to_thread(self._open_writer, run)

    def _open_writer(self, run: RunSink) -> Any:
        tb = self._tb
        path = self._run_dir(run)
        path.mkdir(parents=True, exist_ok=True)
        self.run_dirs.append(path)
        writer = _EventFile(tb, path)
        group = f"{run.experiment}/{run.arm}" if run.experiment and run.arm else None
        hparams = flat_config(run.config)
        summary = tb.hparams_summary.hparams_pb(
            hparams, trial_id=group, start_time_secs=time.time()
        )
        writer.add_event(
            tb.event_pb2.Event(wall_time=time.time(), step=run.last_step, summary=summary)
        )
        writer.flush()
        return writer

    async def _write(self, run: RunSink, rows: list[Row]) -> None:
        await asyncio.to_thread(self._write_rows, run.handle, rows)

    def _write_rows(self, writer: Any, rows: list[Row]) -> None:
        tb = self._tb
        for step, wall_time, values in rows:
            event = tb.event_pb2.Event(wall_time=wall_time, step=step)
            add = event.summary.value.add
            for tag, value in numbers(values, self.source, step).items():
                add(tag=tag, simple_value=value)
            if event.summary.value:
                writer.add_event(event)
        writer.flush()

    async def _benchmark(
        self,
        run: RunSink,
        at: int,
        step: int | None,
        result: EvalResult,
        predictions: list[dict[str, Any]],
    ) -> None:
        if result.tags:
            text = json.dumps(result.tags, sort_keys=True, default=str)
            await asyncio.to_thread(
                self._write_text, run.handle, f"bench/{result.name}/tags", text, at
            )

    def _write_text(self, writer: Any, tag: str, text: str, step: int) -> None:
        tb = self._tb
        metadata = tb.summary_pb2.SummaryMetadata(
            plugin_data=tb.summary_pb2.SummaryMetadata.PluginData(
                plugin_name=tb.text_metadata.PLUGIN_NAME
            )
        )
        tensor = tb.tensor_util.make_tensor_proto([text.encode()], shape=[1])
        event = tb.event_pb2.Event(wall_time=time.time(), step=step)
        event.summary.value.add(tag=tag, tensor=tensor, metadata=metadata)
        writer.add_event(event)
        writer.flush()

    async def _close(self, run: RunSink, end: RunEnd) -> None:
        writer, run.handle = run.handle, None
        if writer is not None:
            await asyncio.to_thread(self._close_writer, writer, end)

    def _close_writer(self, writer: Any, end: RunEnd) -> None:
        tb = self._tb
        status = tb.api_pb2.STATUS_SUCCESS if end.ok else tb.api_pb2.STATUS_FAILURE
        info = tb.plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        content = tb.plugin_data_pb2.HParamsPluginData(
            session_end_info=info, version=tb.hparams_metadata.PLUGIN_DATA_VERSION
        )
        metadata = tb.summary_pb2.SummaryMetadata(
            plugin_data=tb.summary_pb2.SummaryMetadata.PluginData(
                plugin_name=tb.hparams_metadata.PLUGIN_NAME, content=content.SerializeToString()
            )
        )
        summary = tb.summary_pb2.Summary(
            value=[
                tb.summary_pb2.Summary.Value(
                    tag=tb.hparams_metadata.SESSION_END_INFO_TAG, metadata=metadata
                )
            ]
        )
        writer.add_event(tb.event_pb2.Event(wall_time=time.time(), summary=summary))
        writer.close()

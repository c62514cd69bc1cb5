"""``clora batch``: a sweep's jobs, run resumably, one PNG and one manifest line per job.

Each process takes a fixed share of the jobs (``share``: contiguous blocks of the sweep's order,
sizes within one of each other), so a rerun gives every process the same share; the rank and world
size come from the environment torchrun and ``accelerate launch`` set (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), and a plain run is one process. Jobs that differ only in their seed run as one call
with several images (``num_images``), their consecutive seeds in chunks of ``images_per_call``.

Nothing is lost or half-written: a PNG is written to a temporary file (in ``DIR/.partial/rank-R``,
which the process empties when it starts: what a killed run left there) and renamed into place, and
only then is its line appended to ``manifest.jsonl`` (under a lock file, so processes append one whole
line at a time). A rerun skips every job whose last manifest line is ``ok`` for the same spec and whose
PNG still carries that spec; when a process ends it rewrites the manifest with one line per job (the
last), atomically, under the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CLoRAError, one_line
from .memory import process_memory_bytes
from .sweep import Job

MANIFEST = "manifest.jsonl"
IMAGES_PER_CALL = 8


def share(jobs: Sequence[Job], rank: int, world: int) -> list[Job]:
    """Process ``rank``'s jobs: the ``rank``-th of ``world`` contiguous blocks whose sizes differ by at
    most one."""
    n = len(jobs)
    return list(jobs[rank * n // world : (rank + 1) * n // world])


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's / accelerate's environment; (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


class Manifest:
    """``DIR/manifest.jsonl``: one JSON line per finished job, appended under ``DIR/.manifest.lock``."""

    def __init__(self, folder: Path) -> None:
        self.path, self.lock_path = folder / MANIFEST, folder / ".manifest.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last line of every job key."""
        with self._locked():
            return self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        lines: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for text in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):  # a line cut by a crash is skipped
                    line = json.loads(text)
                    if isinstance(line, dict) and "job" in line:
                        lines[line["job"]] = line
        return lines

    def append(self, lines: Sequence[dict[str, Any]]) -> None:
        with self._locked(), open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())

    def compact(self) -> None:
        """One line per job (its last), written to a temporary file and renamed into place."""
        with self._locked():
            lines = self._read()
            tmp = self.path.with_name(f".{MANIFEST}.tmp")
            tmp.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines.values()), "utf-8")
            os.replace(tmp, self.path)


def is_done(job: Job, line: dict[str, Any] | None, folder: Path) -> bool:
    """Whether a rerun may skip ``job``: its last line is ok for the same spec and the PNG carries it."""
    from .pngmeta import read_png_runtime

    if not line or line.get("status") != "ok" or line.get("fingerprint") != job.fingerprint:
        return False
    png = folder / f"{job.key}.png"
    return png.is_file() and read_png_runtime(png).get("job_fingerprint") == job.fingerprint


@dataclass
class BatchResult:
    ran: int  # jobs this process ran (skipped ones not counted)
    failed: int
    skipped: int


def run_batch(
    jobs: Sequence[Job],
    folder: Path,
    load: Callable[[str, str | None], Any],
    runtime: dict[str, Any],
    rank: int = 0,
    world: int = 1,
    images_per_call: int = IMAGES_PER_CALL,
    on_progress: Callable[[int, int], None] | None = None,
    measure_memory: Callable[[], int] | None = None,
) -> BatchResult:
    """Run this process's share of ``jobs`` into ``folder``. ``load(model, model_config)`` gives a
    pipeline; ``on_progress(done, total)`` is told the jobs finished by every process after each call."""
    from .pngmeta import save_png

    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / ".partial" / f"rank-{rank}"
    if partial.is_dir():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    manifest = Manifest(folder)
    latest = manifest.latest()
    mine = share(jobs, rank, world)
    todo = [job for job in mine if not is_done(job, latest.get(job.key), folder)]
    result = BatchResult(ran=0, failed=0, skipped=len(mine) - len(todo))
    for chunk in seed_chunks(todo, images_per_call):
        first, started = chunk[0], time.perf_counter()
        spec = first.spec.replace(num_images=len(chunk))
        try:
            pipe = load(spec.model, spec.model_config)
            output = pipe(spec)
            error = None
        except Exception as exc:  # noqa: BLE001 - a failing job is recorded and the others go on
            error = one_line(exc) if isinstance(exc, CLoRAError) else f"{type(exc).__name__}: {one_line(exc)}"
        seconds = (time.perf_counter() - started) / len(chunk)
        peak = measure_memory() if measure_memory else None
        lines = []
        for k, job in enumerate(chunk):
            path = folder / f"{job.key}.png"
            if error is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                job_runtime = {**runtime, "job": job.key, "job_fingerprint": job.fingerprint}
                save_png(output.images[k], path, output.image_spec(k).to_dict(), job_runtime, temp_dir=partial)
            lines.append(
                {
                    "job": job.key,
                    "composition": job.composition,
                    "method": job.method,
                    "seed": job.seed,
                    "grid": dict(job.grid),
                    "path": str(path.relative_to(folder)),
                    "status": "ok" if error is None else "error",
                    "error": error or "",
                    "seconds": round(seconds, 3),
                    "peak_memory_bytes": peak,
                    "rank": rank,
                    "fingerprint": job.fingerprint,
                }
            )
        manifest.append(lines)
        result.ran += len(chunk)
        result.failed += 0 if error is None else len(chunk)
        if on_progress is not None:
            finished = manifest.latest()
            on_progress(sum(1 for job in jobs if job.key in finished), len(jobs))
    manifest.compact()
    return result


def seed_chunks(jobs: Sequence[Job], images_per_call: int) -> list[list[Job]]:
    """Jobs of one group with consecutive seeds, in runs of at most ``images_per_call``: each run is
    one call with ``num_images`` images (seeds seed, seed+1, ...)."""
    chunks: list[list[Job]] = []
    for job in jobs:
        last = chunks[-1] if chunks else None
        if last and last[-1].seed + 1 == job.seed and len(last) < images_per_call and last[-1].same_but_seed(job):
            last.append(job)
        else:
            chunks.append([job])
    return chunks


def peak_memory_reader(device: Any) -> Callable[[], int | None]:
    """A reader of peak memory: on CUDA the allocator's peak since the last reading, elsewhere the process's
    peak resident size so far."""
    import torch

    def measure() -> int | None:
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return peak
        try:
            return process_memory_bytes()
        except (OSError, ValueError):  # not Linux
            return None

    return measure

"""``dcpio``: inspect, verify, convert, diff, demo and bench, as a thin layer over :mod:`dcpio.tools`.

Every command is a call to a library function; this module only parses arguments, draws progress bars and
tables, and maps outcomes to exit codes:

    0  success: the checkpoint is sound, the checkpoints match, the conversion or demo finished
    1  a checkpoint problem was found: damaged or missing data (verify), a difference (diff), a checkpoint that
       cannot be read, a demo whose resumed state is not bit-exact
    2  usage or environment error: bad arguments, a path that does not exist or is not a checkpoint (an empty
       directory, a plain file, one data file of a checkpoint), missing or refused credentials, a destination
       already there
    3  unexpected failure (a bug): rerun with --debug for the traceback and please report it

Nothing here imports torch until a command runs, so ``--help``, ``--version`` and argument errors answer at once.
Progress bars (rich) appear only when stderr is a terminal and --quiet is not given; NO_COLOR is honoured.

Example::

    from dcpio.cli.main import main
    exit_code = main(["verify", "ckpt/step-1000"])
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from dcpio._version import __version__
from dcpio.errors import CheckpointError, CheckpointExistsError, IncompleteCheckpointError
from dcpio.names import METADATA_NAME, SAFETENSORS_SUFFIX, is_dcp_member

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "build_parser", "entry", "main"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_FAILURE = 3

_EXIT_CODES_HELP = """\
exit codes:
  0  success (sound checkpoint, checkpoints match, conversion/demo done)
  1  checkpoint problem found (damaged or missing data, a difference, unreadable checkpoint)
  2  usage or environment error (bad arguments, missing path or not a checkpoint,
     missing credentials, destination exists)
  3  unexpected failure: rerun with --debug and report the traceback

environment: NO_COLOR disables colour; progress bars only on a terminal (never with --quiet)."""


class UsageError(Exception):
    """A mistake in how the command was called (exit code 2); ``hint`` None when the message says what to do."""

    def __init__(self, message: str, hint: str | None = "see dcpio --help") -> None:
        super().__init__(message)
        self.hint = hint


# botocore's names for "no usable credentials": an environment problem, not a damaged checkpoint
_CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"})


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


class _UI:
    """Output: plain text on stdout, errors and progress on stderr; rich only where it helps (a terminal)."""

    def __init__(self, quiet: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.quiet = quiet
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.color = not os.environ.get("NO_COLOR") and _isatty(self.out)

    def print(self, line: str = "") -> None:
        print(line, file=self.out)

    def info(self, line: str) -> None:
        """A progress note on stderr (suppressed by --quiet)."""
        if not self.quiet:
            print(line, file=self.err)

    def note(self, line: str) -> None:
        """A ``note:`` line on stdout, beside the result (suppressed by --quiet)."""
        if not self.quiet:
            print(f"{self.style('note', 'yellow')}: {line}", file=self.out)

    def style(self, text: str, color: str) -> str:
        if not self.color:
            return text
        codes = {"green": "32", "red": "31", "yellow": "33", "bold": "1", "dim": "2"}
        return f"\033[{codes[color]}m{text}\033[0m"

    def error(self, message: str, hint: str | None = None) -> None:
        lines = str(message).strip().splitlines() or ["(no message)"]
        print(f"dcpio: error: {lines[0]}", file=self.err)
        if hint:
            print(f"hint: {hint}", file=self.err)

    @contextmanager
    def progress(self, label: str) -> Iterator[Callable[[str, int, int], None] | None]:
        """A ``progress(description, completed, total)`` callback drawing a rich bar, or None when not wanted."""
        if self.quiet or not _isatty(self.err):
            yield None
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
        except ImportError:  # rich is optional: no bar, same results
            yield None
            return
        console = Console(file=self.err, no_color=bool(os.environ.get("NO_COLOR")))
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(label, total=None)

            def update(description: str, completed: int, total: int) -> None:
                bar.update(task, completed=completed, total=total or None)

            yield update


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # closed or detached stream
        return False


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    """Left-aligned columns (right-aligned where every cell looks like a number or a size)."""
    cols = list(zip(*([header, *rows]))) if rows else [(h,) for h in header]
    widths = [max(len(c) for c in col) for col in cols]
    numeric = [
        all(c and (c[0].isdigit() or c == "-") for c in col[1:]) and len(col) > 1 and i > 0
        for i, col in enumerate(cols)
    ]

    def fmt(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return "  ".join(cells).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


# --------------------------------------------------------------------------------------------------- paths
def _check_path(path: str, command: str) -> None:
    """Refuse, as a usage error (exit 2), a local path that cannot be a checkpoint, before anything is read.

    An empty directory, a directory with no checkpoint files, a plain file and one data file of a DCP checkpoint
    are mistakes in the command line, not damaged checkpoints. A directory holding data files but no ``.metadata``
    is left to the command: that is a checkpoint whose save never committed (exit 1). URLs and missing paths are
    left to the command too.
    """
    if "://" in path or not os.path.exists(path):
        return
    what = "point at a DCP checkpoint directory (the one holding .metadata), a Hugging Face folder or a torch.save file"
    if os.path.isdir(path):
        names = os.listdir(path)
        if not names:
            raise UsageError(f"{path} is an empty directory, not a checkpoint; {what}", None)
        if not any(n == METADATA_NAME or n.endswith(SAFETENSORS_SUFFIX) or is_dcp_member(n) for n in names):
            raise UsageError(
                f"{path} holds no checkpoint files (no .metadata, *.distcp or *.safetensors); {what}", None
            )
        return
    name = os.path.basename(path)
    if name == METADATA_NAME or name.endswith(SAFETENSORS_SUFFIX):
        return
    if is_dcp_member(name):
        folder = os.path.dirname(path) or "."
        raise UsageError(
            f"{path} is one file of the DCP checkpoint in {folder}; "
            f"pass the directory instead: dcpio {command} {folder}",
            None,
        )
    with open(path, "rb") as stream:
        if stream.read(4) != b"PK\x03\x04":
            raise UsageError(
                f"{path} is not a checkpoint file (neither a torch.save file nor .safetensors); {what}", None
            )


# --------------------------------------------------------------------------------------------------- commands
def _cmd_inspect(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.tools.inspect import inspect_checkpoint

    _check_path(args.path, "inspect")
    s = inspect_checkpoint(args.path, storage_options=_storage_options(args))
    if args.json:
        ui.print(json.dumps(s.to_dict(), indent=2))
        return EXIT_OK
    tensors = [i for i in s.items if i.kind == "tensor"]
    objects = [i for i in s.items if i.kind != "tensor"]
    extra = []
    if s.writer:
        extra.append(f"writer: {s.writer}")
    if s.format.startswith("dcp"):
        extra.append("checksummed" if s.checksummed else "no checksums")
    ui.print(f"path:        {s.path}")
    ui.print(f"format:      {s.format}" + (f" ({', '.join(extra)})" if extra else ""))
    if s.ranks is not None:
        ui.print(f"ranks:       {s.ranks}")
    ui.print(f"files:       {len(s.files)} ({_fmt_bytes(s.total_bytes)} on storage)")
    if s.transforms:
        ui.print(f"transforms:  {', '.join(s.transforms)}")
    ui.print(
        f"items:       {len(tensors)} tensors ({_fmt_bytes(sum(i.nbytes for i in tensors))})"
        + (f", {len(objects)} non-tensor values" if objects else "")
    )
    ui.print()
    rows = []
    for i in s.items:
        files = ", ".join(i.files[:3]) + (f" +{len(i.files) - 3}" if len(i.files) > 3 else "")
        rows.append(
            [
                i.name,
                i.dtype or "object",
                str(i.shape) if i.shape is not None else "-",
                str(i.chunks),
                _fmt_bytes(i.stored_bytes),
                files,
            ]
        )
    for line in _table(rows, ["name", "dtype", "shape", "chunks", "bytes", "files"]):
        ui.print(line)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.tools.verify import verify_checkpoint

    _check_path(args.path, "verify")
    t0 = time.perf_counter()
    with ui.progress("verifying") as progress:
        report = verify_checkpoint(args.path, progress=progress, storage_options=_storage_options(args))
    dt = time.perf_counter() - t0
    if args.json:
        ui.print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK if report.ok else EXIT_PROBLEM
    what = "checksums verified" if report.checksummed else "structure checked (no dcpio checksums in it)"
    if report.ok:
        ui.print(
            f"{ui.style('OK', 'green')}  {report.path}: {report.items_checked} items, "
            f"{_fmt_bytes(report.bytes_read)} read in {dt:.1f}s, {what}"
        )
    else:
        lines = _problem_lines(report.problems)
        files = report.damaged_files()
        ui.print(
            f"{ui.style('DAMAGED', 'red')}  {report.path}: {len(lines)} problem(s)"
            + (f" in {', '.join(files)}" if files else "")
        )
        for line in lines:
            ui.print(line)
    if report.unreferenced:
        ui.note(
            f"{len(report.unreferenced)} file(s) not referenced by the metadata "
            f"(leftovers; loading ignores them): {', '.join(report.unreferenced)}"
        )
    return EXIT_OK if report.ok else EXIT_PROBLEM


def _problem_lines(problems: Sequence[Any]) -> list[str]:
    """One line per problem, except that a missing or truncated file takes the problems of its items into its own
    line (counted, the first few named): they all follow from it, and a line per tensor would bury it."""
    whole = {p.file for p in problems if p.item is None and p.file and p.kind in ("missing-file", "truncated")}
    items_of: dict[str, list[str]] = {}
    for p in problems:
        if p.item is not None and p.file in whole:
            items_of.setdefault(p.file, []).append(p.item)
    lines = []
    for p in problems:
        if p.item is not None and p.file in whole:
            continue
        where = " ".join(x for x in (p.file or "", f"[{p.item}]" if p.item else "") if x)
        line = f"  {p.kind:<13} {where}: {p.message}"
        lost = items_of.get(p.file or "", []) if p.item is None else []
        if lost:
            shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            line += f" {len(lost)} item(s) in it cannot be read: {shown}"
        lines.append(line)
    return lines


def _cmd_diff(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.tools.diff import diff_checkpoints

    _check_path(args.a, "diff")
    _check_path(args.b, "diff")
    with ui.progress("comparing") as progress:
        report = diff_checkpoints(
            args.a, args.b, atol=args.atol, progress=progress, storage_options=_storage_options(args)
        )
    if args.json:
        ui.print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK if report.match else EXIT_PROBLEM
    shown = report.entries if args.all else [e for e in report.entries if e.status != "equal"]
    rows = [[e.name, e.status, "-" if e.max_abs_diff is None else f"{e.max_abs_diff:.6g}", e.detail] for e in shown]
    if rows:
        for line in _table(rows, ["name", "status", "max_abs_diff", "detail"]):
            ui.print(line)
        ui.print()
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.counts().items()))
    verdict = ui.style("MATCH", "green") if report.match else ui.style("DIFFER", "red")
    ui.print(f"{verdict}  {len(report.entries)} entries: {counts or 'none'}")
    return EXIT_OK if report.match else EXIT_PROBLEM


def _cmd_convert(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.tools.convert import convert, parse_size

    try:
        limit = parse_size(args.max_shard_size)
    except ValueError as err:
        raise UsageError(str(err)) from err
    _check_path(args.src, "convert")
    t0 = time.perf_counter()
    with ui.progress(f"converting to {args.to}") as progress:
        res = convert(
            args.src,
            args.dst,
            to=args.to,
            max_shard_size=limit,
            overwrite=args.overwrite,
            progress=progress,
            storage_options=_storage_options(args),
            only=args.only or (),
            exclude=args.exclude or (),
            strip_prefix=args.strip_prefix or (),
            rename=args.rename,
            serialization_format=args.format,
            compress=args.compress,
        )
    dt = time.perf_counter() - t0
    ui.print(
        f"wrote {res.tensors} tensors ({_fmt_bytes(res.bytes)}) to {res.dst} as {args.to} in {dt:.1f}s: "
        + ", ".join(res.files[:6])
        + (f" +{len(res.files) - 6} more" if len(res.files) > 6 else "")
    )
    if res.skipped:
        ui.note(
            f"{len(res.skipped)} non-tensor value(s) not representable in {args.to} "
            f"were left out: {', '.join(res.skipped[:10])}" + (" ..." if len(res.skipped) > 10 else "")
        )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.tools.demo import run_demo

    res = run_demo(args.dir, steps=args.steps, log=ui.info)
    if args.json:
        ui.print(json.dumps(res.to_dict(), indent=2))
        return EXIT_OK if res.ok else EXIT_PROBLEM
    ok, bad = ui.style("OK", "green"), ui.style("FAILED", "red")
    ui.print(
        f"model: {res.parameters / 1e6:.1f}M parameters; checkpoint: {_fmt_bytes(res.state_bytes)} "
        f"(model + AdamW state) from {res.world_size} ranks, {len(res.files)} files per step"
    )
    ui.print(
        f"save, dcpio.FileSystemWriter via CheckpointManager: {res.save_s:.2f} s  {res.save_mb_s:.1f} MB/s "
        f"(step {res.steps}); steps kept (keep_last=2): {', '.join(map(str, res.kept_steps))}"
    )
    ui.print(
        f"{ok if res.crash_intact else bad}  crashed save: step {res.crash_step} SIGKILLed with {res.crash_files} "
        f"data file(s) begun; newest committed step still {res.crash_latest}"
    )
    if res.bit_exact:
        ui.print(
            f"{ok}  resume on 1 process (2 ranks -> 1) in {res.load_s:.2f} s: {res.tensors_checked} tensors "
            f"({_fmt_bytes(res.bytes_checked)}) identical bit for bit"
        )
    else:
        ui.print(f"{bad}  {len(res.mismatches)} entries differ after resume: {', '.join(res.mismatches[:10])}")
    if res.partial_read_bytes:
        share = res.partial_read_bytes / max(1, res.checkpoint_bytes)
        ui.print(
            f"model alone: read {_fmt_bytes(res.partial_read_bytes)} of the {_fmt_bytes(res.checkpoint_bytes)} "
            f"checkpoint ({share:.0%})"
        )
        ui.print(f"  dcpio's reader: {res.partial_stats}")
    torch_said = "torch's stock reader loaded it without an error" if res.torch_loaded_corrupt else "torch refused it"
    ui.print(
        f"{ok if res.corrupt_caught else bad}  one flipped byte: dcpio refused the load "
        f"({res.corrupt_message or 'no error'}); {torch_said}"
    )
    ui.print(f"total {res.total_s:.1f} s")
    if args.dir:
        ui.print(f"checkpoints kept in {res.directory}")
    return EXIT_OK if res.ok else EXIT_PROBLEM


def _cmd_ls(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.manager import list_steps

    infos = list_steps(args.root, local_root=args.local_root, storage_options=_storage_options(args))
    if args.json:
        ui.print(json.dumps([i.to_dict() for i in infos], indent=2))
        return EXIT_OK
    now = time.time()
    rows = [
        [
            str(i.step),
            i.tier,
            "yes" if i.committed else ("DAMAGED" if i.damaged else "NO"),
            _fmt_bytes(i.size),
            str(i.files),
            _fmt_age(now - i.mtime),
        ]
        for i in infos
    ]
    for line in _table(rows, ["step", "tier", "committed", "size", "files", "age"]):
        ui.print(line)
    if not infos:
        ui.info(f"{args.root}: no step directories (step-NNNNNNNN) found")
    return EXIT_OK


def _fmt_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(0.0, seconds):.0f}s"


def _cmd_prune(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.manager import prune

    if args.keep < 1 or (args.keep_every is not None and args.keep_every < 1) or not args.grace >= 0:
        raise UsageError("--keep and --keep-every must be at least 1, --grace 0 or more seconds")
    report = prune(
        args.root,
        keep_last=args.keep,
        keep_every=args.keep_every,
        grace_s=args.grace,
        dry_run=args.dry_run,
        storage_options=_storage_options(args),
    )
    if args.json:
        ui.print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    ui.print(f"kept {len(report.kept)} committed step(s): {', '.join(map(str, report.kept)) or 'none'}")
    ui.print(f"{verb} {len(report.deleted)} committed step(s): {', '.join(map(str, report.deleted)) or 'none'}")
    ui.print(f"{verb} {len(report.swept)} uncommitted leftover(s): {', '.join(map(str, report.swept)) or 'none'}")
    return EXIT_OK


def _bench_script() -> Path | None:
    """``benchmarks/run.py`` of the source checkout this dcpio runs from, or None for an installed package."""
    import dcpio

    script = Path(dcpio.__file__).resolve().parent.parent.parent / "benchmarks" / "run.py"
    return script if script.is_file() else None


def _run_bench(argv: Sequence[str], ui: _UI) -> int:
    """``dcpio bench ARGS``: the benchmark lives outside the package, in the checkout's ``benchmarks/``."""
    script = _bench_script()
    if script is None:
        ui.error(
            "the benchmark is not part of the installed package: it lives in the benchmarks/ folder of a source "
            "checkout of dcpio",
            "clone the repository and run `python benchmarks/run.py` there (or `dcpio bench` from an editable "
            "install: pip install -e .)",
        )
        return EXIT_USAGE
    import dcpio

    # the benchmark must measure this same dcpio, whether it came from an install or from PYTHONPATH
    env = dict(os.environ)
    src = str(Path(dcpio.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return subprocess.call([sys.executable, str(script), *argv], env=env)


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """``-o KEY=VALUE`` pairs as fsspec storage options; a VALUE that parses as JSON is used as such."""
    out: dict[str, Any] = {}
    for pair in getattr(args, "storage_option", None) or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-o expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


# ----------------------------------------------------------------------------------------------------- parser
def _tolerance(text: str) -> float:
    """``--atol``: a finite number, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance: give a finite number >= 0, e.g. 1e-6")
    return value


def _step_count(text: str) -> int:
    """``--steps``: a whole number, one or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the demo needs at least 1 training step")
    return value


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand's copy of these flags must not reset what was given before the subcommand
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or notes")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``dcpio`` argument parser (every subcommand, with exit codes in ``--help``)."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="dcpio",
        description="Inspect, verify, convert and compare torch.distributed.checkpoint checkpoints; run the demo "
        "and the benchmark.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dcpio {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "-o",
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec storage option for URL paths, repeatable; VALUE may be JSON, e.g. "
        '-o client_kwargs=\'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )

    def add(name: str, help_: str, url: bool = True) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            parents=[common, remote] if url else [common],
            epilog=_EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("inspect", "show what a checkpoint holds: format, writer, ranks, files, and every item")
    p.add_argument("path", help="DCP directory or fsspec URL, Hugging Face safetensors folder, or torch.save file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = add("verify", "read every byte, check checksums and structure; report each damaged file and tensor")
    p.add_argument("path", help="DCP directory or fsspec URL, Hugging Face safetensors folder, or torch.save file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_verify)

    p = add("convert", "convert between DCP, Hugging Face safetensors and a single torch.save file (streaming)")
    p.add_argument("src", help="source checkpoint (DCP directory/URL, HF folder, or torch.save file)")
    p.add_argument("dst", help="destination: a directory for --to hf/dcp, a file for --to torch")
    p.add_argument("--to", required=True, choices=("hf", "dcp", "torch"), help="target format")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard for --to hf, e.g. 5GB, 500MB (default 5GB)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing destination (its checkpoint files only: config.json, tokenizer files ... stay)",
    )
    p.add_argument("--only", action="append", metavar="PREFIX", help="keep only keys starting with PREFIX (repeatable)")
    p.add_argument(
        "--exclude", action="append", metavar="PREFIX", help="leave out keys starting with PREFIX (repeatable)"
    )
    p.add_argument(
        "--strip-prefix", action="append", metavar="PREFIX", help="remove PREFIX from key names, e.g. model."
    )
    p.add_argument(
        "--rename", action="append", metavar="OLD=NEW", help="replace the key prefix OLD by NEW (repeatable)"
    )
    p.add_argument("--format", choices=("torch_save", "safetensors"), help="serialization format for --to dcp")
    p.add_argument("--compress", choices=("zstd",), help="compress every item (--to dcp; needs zstandard)")
    p.set_defaults(func=_cmd_convert)

    p = add("diff", "compare two checkpoints tensor by tensor; exit 0 when they match, 1 when not")
    p.add_argument("a", help="first checkpoint (any kind dcpio reads)")
    p.add_argument("b", help="second checkpoint (any kind dcpio reads)")
    p.add_argument(
        "--atol",
        type=_tolerance,
        default=0.0,
        help="count tensors within this max abs difference as matching (default 0: bit for bit)",
    )
    p.add_argument("--all", action="store_true", help="list equal entries too")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_diff)

    p = add(
        "demo",
        "train on 2 gloo ranks saving through CheckpointManager; crash a save, resume on 1, catch a flipped byte",
        url=False,
    )
    p.add_argument("dir", nargs="?", default=None, help="keep the checkpoints here (default: a temporary directory)")
    p.add_argument("--steps", type=_step_count, default=3, help="training steps before saving (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_demo)

    p = add("ls", "list a CheckpointManager root's steps: committed or not, tier, size, age")
    p.add_argument("root", help="the manager's root directory or fsspec URL")
    p.add_argument("--local-root", default=None, help="also list this local tier")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_ls)

    p = add("prune", "delete a CheckpointManager root's old steps: keep the newest N, sweep old uncommitted ones")
    p.add_argument("root", help="the manager's root directory or fsspec URL")
    p.add_argument("--keep", type=int, required=True, help="committed steps to keep (the newest is always kept)")
    p.add_argument("--keep-every", type=int, default=None, help="also keep every step divisible by K")
    p.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="sweep uncommitted steps untouched for this many seconds (default 3600)",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_prune)

    # listed for --help only: main() hands everything after "bench" to the benchmark script untouched
    sub.add_parser(
        "bench",
        help="benchmark dcpio against stock torch and raw I/O (from a source checkout; dcpio bench --help)",
        add_help=False,
    )
    return parser


def _credentials_missing(err: BaseException) -> bool:
    """True when ``err`` or an error it was raised from says there were no usable credentials."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ in _CREDENTIAL_ERRORS:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _hint_for(err: BaseException, args: argparse.Namespace) -> str | None:
    remote = any("://" in str(getattr(args, name, "") or "") for name in ("path", "src", "a", "b"))
    if isinstance(err, FileNotFoundError):
        return "check the path; a DCP checkpoint is the directory holding .metadata"
    if isinstance(err, PermissionError) or _credentials_missing(err):
        if remote:
            return "pass credentials with -o key=... -o secret=... (or the AWS_* environment) and check the endpoint"
        return "check the file's owner and mode"
    if isinstance(err, CheckpointExistsError):
        return "choose another destination or pass --overwrite"
    if isinstance(err, IncompleteCheckpointError) or args.command == "verify":
        return "--debug shows the traceback"
    if isinstance(err, CheckpointError):
        path = getattr(args, "path", None) or getattr(args, "src", None) or "PATH"
        return f"run `dcpio verify {path}` for a full report; --debug shows the traceback"
    return None


def _exit_code_for(err: Exception) -> int:
    """The documented exit code of a failed command (see the module docstring)."""
    if isinstance(err, UsageError | ValueError | CheckpointExistsError) or _credentials_missing(err):
        return EXIT_USAGE
    if isinstance(err, FileNotFoundError | PermissionError | NotADirectoryError | IsADirectoryError):
        return EXIT_USAGE
    if isinstance(err, CheckpointError):
        return EXIT_PROBLEM
    return EXIT_FAILURE


def _report(err: Exception, args: argparse.Namespace, ui: _UI) -> int:
    """Print ``err`` as one ``dcpio: error:`` line and a hint (the traceback too with --debug); return the exit code."""
    code = _exit_code_for(err)
    if getattr(args, "debug", False) and not isinstance(err, UsageError):
        traceback.print_exc()
    if isinstance(err, UsageError):
        ui.error(str(err), err.hint)
    elif isinstance(err, OSError) and not isinstance(err, CheckpointError) and err.filename:
        message = err.strerror or str(err)
        if str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        ui.error(message, _hint_for(err, args))
    elif code == EXIT_FAILURE:
        first = str(err).splitlines()[0] if str(err) else ""
        ui.error(
            f"unexpected failure: {type(err).__name__}: {first}",
            "this is a bug in dcpio; rerun with --debug and report the traceback",
        )
    else:
        hint = "see dcpio COMMAND --help" if isinstance(err, ValueError) else _hint_for(err, args)
        ui.error(str(err), hint)
    return code


def _split_bench(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """``(dcpio's own arguments, the benchmark's)``: everything after a ``bench`` command word is the benchmark's."""
    for i, arg in enumerate(argv):
        if arg == "bench":
            return list(argv[: i + 1]), list(argv[i + 1 :])
        if not arg.startswith("-"):
            break
    return list(argv), None


def main(argv: list[str] | None = None) -> int:
    """Run the ``dcpio`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        dcpio 0.1.0
        0
    """
    own, bench_argv = _split_bench(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(own)
    except SystemExit as exc:  # argparse exits 2 on a usage error and 0 after --help / --version
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    ui = _UI(quiet=bool(getattr(args, "quiet", False)))
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if bench_argv is not None:
            return _run_bench(bench_argv, ui)
        return int(args.func(args, ui))
    except KeyboardInterrupt:
        ui.error("interrupted")
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`dcpio inspect ... | head`): not an error worth a message;
        # point stdout at /dev/null so the interpreter's final flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:  # every failure becomes one line and a documented exit code
        return _report(err, args, ui)


def entry() -> None:
    """Console-script entry point (``dcpio``)."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

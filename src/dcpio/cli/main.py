"""``dcpio``: inspect, verify, convert, diff, demo and bench, as a thin layer over :mod:`dcpio.tools`.

Every command is a call to a library function; this module only parses arguments, draws progress bars and
tables, and maps outcomes to exit codes:

    0  success: the checkpoint is sound, the checkpoints match, the conversion or demo finished
    1  a checkpoint problem was found: damaged or missing data (verify), a difference (diff), a checkpoint that
       cannot be read, a demo whose resumed state is not bit-exact
    2  usage or environment error: bad arguments, a path that does not exist, a destination already there
    3  unexpected failure (a bug): rerun with --debug for the traceback and please report it

Progress bars (rich) appear only when stderr is a terminal and --quiet is not given; NO_COLOR is honoured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from dcpio.errors import CheckpointError, CheckpointExistsError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "build_parser", "entry", "main"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_FAILURE = 3

_EXIT_CODES_HELP = """\
exit codes:
  0  success (sound checkpoint, checkpoints match, conversion/demo done)
  1  checkpoint problem found (damaged or missing data, a difference, unreadable checkpoint)
  2  usage or environment error (bad arguments, missing path, destination exists)
  3  unexpected failure: rerun with --debug and report the traceback

environment: NO_COLOR disables colour; progress bars only on a terminal (never with --quiet)."""


class UsageError(Exception):
    """A mistake in how the command was called (exit code 2)."""


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


# --------------------------------------------------------------------------------------------------- commands
def _cmd_inspect(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.tools.inspect import inspect_checkpoint

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
        files = report.damaged_files()
        ui.print(
            f"{ui.style('DAMAGED', 'red')}  {report.path}: {len(report.problems)} problem(s)"
            + (f" in {', '.join(files)}" if files else "")
        )
        for p in report.problems:
            where = " ".join(x for x in (p.file or "", f"[{p.item}]" if p.item else "") if x)
            ui.print(f"  {p.kind:<13} {where}: {p.message}")
    if report.unreferenced:
        ui.print(
            f"{ui.style('note', 'yellow')}: {len(report.unreferenced)} file(s) not referenced by the metadata "
            f"(leftovers; loading ignores them): {', '.join(report.unreferenced)}"
        )
    return EXIT_OK if report.ok else EXIT_PROBLEM


def _cmd_diff(args: argparse.Namespace, ui: _UI) -> int:
    from dcpio.tools.diff import diff_checkpoints

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
        )
    dt = time.perf_counter() - t0
    ui.print(
        f"wrote {res.tensors} tensors ({_fmt_bytes(res.bytes)}) to {res.dst} as {args.to} in {dt:.1f}s: "
        + ", ".join(res.files[:6])
        + (f" +{len(res.files) - 6} more" if len(res.files) > 6 else "")
    )
    if res.skipped:
        ui.print(
            f"{ui.style('note', 'yellow')}: {len(res.skipped)} non-tensor value(s) not representable in {args.to} "
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


def _cmd_bench(args: argparse.Namespace, ui: _UI) -> int:
    run = getattr(args, "_bench_run", None)
    if run is None:
        ui.error(
            "the benchmark is not available in this installation (dcpio.bench could not be imported)",
            "reinstall dcpio from a full checkout: pip install -e '.[dev]'",
        )
        return EXIT_USAGE
    return int(run(args))


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=_cmd_convert)

    p = add("diff", "compare two checkpoints tensor by tensor; exit 0 when they match, 1 when not")
    p.add_argument("a", help="first checkpoint (any kind dcpio reads)")
    p.add_argument("b", help="second checkpoint (any kind dcpio reads)")
    p.add_argument(
        "--atol",
        type=float,
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
    p.add_argument("--steps", type=int, default=3, help="training steps, a save after each (default 3)")
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

    try:
        from dcpio.bench import add_arguments, run_bench
    except ImportError:
        p = sub.add_parser("bench", help="the I/O benchmark (not available in this installation)")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=_cmd_bench)
    else:
        p = sub.add_parser(
            "bench",
            help="benchmark dcpio's save and load against stock torch",
            description="benchmark dcpio's save and load against stock torch",
        )
        add_arguments(p)
        p.set_defaults(func=_cmd_bench, _bench_run=run_bench)
    return parser


def _hint_for(err: BaseException) -> str | None:
    if isinstance(err, FileNotFoundError):
        return "check the path; a DCP checkpoint is the directory holding .metadata"
    if isinstance(err, PermissionError):
        return "check the file's owner and mode"
    if isinstance(err, CheckpointExistsError):
        return "choose another destination or pass --overwrite"
    if isinstance(err, CheckpointError):
        return "run `dcpio verify PATH` for a full report; --debug shows the traceback"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the ``dcpio`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on a usage error and 0 after --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    ui = _UI(quiet=bool(getattr(args, "quiet", False)))
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
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
    except UsageError as err:
        ui.error(str(err), "see dcpio --help")
        return EXIT_USAGE
    except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as err:
        if debug:
            traceback.print_exc()
        message = err.strerror or str(err)
        if err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        ui.error(message, _hint_for(err))
        return EXIT_USAGE
    except CheckpointExistsError as err:
        if debug:
            traceback.print_exc()
        ui.error(str(err), _hint_for(err))
        return EXIT_USAGE
    except CheckpointError as err:
        if debug:
            traceback.print_exc()
        ui.error(str(err), _hint_for(err))
        return EXIT_PROBLEM
    except ValueError as err:
        if debug:
            traceback.print_exc()
        ui.error(str(err), "see dcpio COMMAND --help")
        return EXIT_USAGE
    except Exception as err:  # the last line of defence: a bug, reported in one line unless --debug
        if debug:
            traceback.print_exc()
        ui.error(
            f"unexpected failure: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            "this is a bug in dcpio; rerun with --debug and report the traceback",
        )
        return EXIT_FAILURE


def entry() -> None:
    """Console-script entry point (``dcpio``)."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

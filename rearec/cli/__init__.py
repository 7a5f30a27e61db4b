"""The ``rearec`` command line: one module per command, listed in :data:`COMMANDS`.

Each command module has ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> 0``; a command reports failure by raising, and :func:`main` turns that into one line on
stderr and an exit code:

  0    success
  1    training diverged (the best checkpoint is kept)             console.Diverged
  2    a mistake in the options, the data or the files             ValueError (CommandError, DataError,
       (``rearec: error: <problem>; <fix>``)                        RunFolderError, ...) or OSError; out of
                                                                    memory (sizes too large for the machine)
  130  interrupted (Ctrl-C)                                         KeyboardInterrupt
  143  terminated (SIGTERM: kill, timeout, a job scheduler)         KeyboardInterrupt, as Ctrl-C

Set ``REAREC_DEBUG=1`` to get tracebacks instead of one-line errors.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import List, Optional

from rearec.cli import evaluate, profile, quickstart, recommend, study, train
from rearec.cli.console import (PROG, Diverged, choose_threads, discard_stdout, one_line, out_of_memory, print_error,
                                refuse_multiple_processes)

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + 15  # SIGTERM
#: Seconds a rank that saw another fail waits before it exits (see run_and_exit).
RANK_FAILURE_DELAY_S = 2.0

#: The commands, in the order ``rearec --help`` lists them.
COMMANDS = (train, evaluate, recommend, quickstart, study, profile)


class UsageError(Exception):
    """argparse found a mistake on the command line."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rearec: error: <problem>; see 'rearec train --help'``."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="ReaRec (Think Before Recommend): train, evaluate and serve sequential "
                                           "recommenders that reason before they recommend.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(p)
        p.set_defaults(run=command.run, distributed=getattr(command, "DISTRIBUTED", False), command_parser=p)
    return parser


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """The command line's arguments; an argument no parser knows is the command's mistake (its --help
    is the one to read), not the top level's, where argparse would report it."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    debug = os.environ.get("REAREC_DEBUG", "") not in ("", "0")
    try:
        try:
            args = parse(argv)
        except UsageError as error:
            print_error(f"{' '.join(str(error).split())}; see '{error.prog} --help'")
            return EXIT_USAGE
        except SystemExit as done:  # --help
            return done.code if isinstance(done.code, int) else EXIT_OK
        if not args.distributed:  # commands that do not run under torchrun
            refuse_multiple_processes()
        if hasattr(args, "threads"):
            _, args.threads_note = choose_threads(args.threads)
        return args.run(args)
    except Diverged as error:
        print_error(one_line(error))
        return EXIT_DIVERGED
    except BrokenPipeError as error:  # the reader of stdout went away (| head): nothing the user must fix
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            discard_stdout()
            return EXIT_OK
        print_error(one_line(error))  # another pipe broke: a real error
        return EXIT_USAGE
    except KeyboardInterrupt as interrupted:
        print_error(one_line(interrupted) if str(interrupted) else "interrupted")
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as error:
        if debug:
            raise
        print_error(one_line(error))
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as error:  # an allocation too large for this machine: a size to lower
        if debug or out_of_memory(error) is None:
            raise
        print_error(out_of_memory(error))
        return EXIT_USAGE


def run_and_exit(argv: Optional[List[str]] = None) -> None:
    """The console script and ``python -m rearec``: ``main``'s code as the process's exit status.
    After another rank of a torchrun job died, the broken process group can abort the interpreter's
    shutdown (SIGABRT instead of the code); such a process ends at once, with its code.

    Under torchrun a failing run ends so that torchrun blames the right rank (it names the first process
    to exit as the root cause and stops the others): the rank whose own error ended the run exits at
    once, and a rank that only saw another fail (code 3) waits a moment first."""
    terminated = []

    def on_sigterm(signum, frame):  # as Ctrl-C: what was saved and how to resume, then exit 143
        terminated.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, on_sigterm)
    code = main(argv)
    if terminated and code == EXIT_INTERRUPTED:
        code = EXIT_TERMINATED
    world = os.environ.get("WORLD_SIZE", "")
    under_torchrun = world.isdigit() and int(world) > 1
    if code == train.EXIT_RANK_FAILURE or (code != 0 and under_torchrun):
        sys.stdout.flush()
        sys.stderr.flush()
        if code == train.EXIT_RANK_FAILURE and under_torchrun:
            time.sleep(RANK_FAILURE_DELAY_S)
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run_and_exit()

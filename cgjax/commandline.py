"""cgjax's one command-line dialect: absl flags, and ``--config FILE[:ARG]`` with
``--config.FIELD=VALUE`` overrides (``ml_collections.config_flags``) where a command reads a config.

A command defines its flags in one function ``define(fv, argv)`` on an ``absl.flags.FlagValues``
(``argv``, the whole command line with the program name, is what ``config_flags`` reads the
``--config.FIELD`` overrides from; ``None`` means ``sys.argv``) and does its work from the parsed
flags. Two ways to run it:

* :func:`run` (the scripts, ``python -m ...``): the flags go on absl's global ``flags.FLAGS`` and
  the command runs under ``absl.app.run``, like ``scripts/train.py``: ``--help`` / ``--helpfull``,
  a mistyped or malformed flag is a usage error naming it (exit status 1);
* :func:`parse` (in-process: tests, notebooks, another command): an argv list parsed into a fresh
  ``FlagValues`` (absl's global one cannot define a flag twice); errors raise ``flags.Error``.

Both refuse positional arguments: every value belongs to a flag, and a flag that takes several
values is repeated (``--signals A --signals B``).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import app, flags

Define = Callable[[flags.FlagValues, "Sequence[str] | None"], Any]


class UsageError(flags.Error):
    """A command line that parses but cannot run (positional arguments, a removed flag)."""


def _no_positional(rest: Sequence[str]) -> None:
    if rest:
        raise UsageError(f"unexpected argument(s) {' '.join(map(repr, rest))}: every value belongs to a flag "
                         "(--flag VALUE or --flag=VALUE); a flag that takes several values is repeated, "
                         "e.g. --signals A --signals B")


def _unknown_override(argv: Sequence[str], e: Exception) -> str | None:
    """The message for a ``--config.FIELD`` override naming no field (``config_flags`` raises an
    ``AttributeError``/``KeyError`` there, not a flag error), or None for any other error."""
    given = [a.split("=", 1)[0] for a in argv if a.lstrip("-").startswith("config.")]
    if not given:
        return None
    return (f"a --config.FIELD override names a field the config does not have ({type(e).__name__}: {e}); "
            f"overrides given: {', '.join(given)}")


def parse(define: Define, argv: Sequence[str], prog: str = "cgjax") -> flags.FlagValues:
    """``argv`` (without the program name) parsed with ``define``'s flags into a new ``FlagValues``.

    Unknown or malformed flags, a missing required flag and positional arguments raise
    ``flags.Error`` (its message names the flag)."""
    full = [prog, *(str(a) for a in argv)]
    fv = flags.FlagValues()
    define(fv, full)
    try:
        rest = fv(full)
    except (AttributeError, KeyError) as e:
        msg = _unknown_override(full, e)
        if msg is None:
            raise
        raise UsageError(msg) from e
    _no_positional(rest[1:])
    return fv


def run(define: Define, main: Callable[[flags.FlagValues], Any]) -> None:
    """The script entry point: ``define``'s flags on ``flags.FLAGS``, then ``absl.app.run`` calls
    ``main(flags.FLAGS)``. An ``int`` it returns is the exit status (anything else, e.g. a report
    dict, is 0); a :class:`UsageError` it raises prints the usage and exits 1."""
    before = set(flags.FLAGS)
    define(flags.FLAGS, None)
    # --help lists the main module's key flags: the command's own, wherever define() lives
    new = {id(flags.FLAGS[n]): flags.FLAGS[n] for n in sorted(set(flags.FLAGS) - before)}
    for flag in new.values():
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def entry(argv: Sequence[str]) -> int:
        try:
            _no_positional(argv[1:])
            status = main(flags.FLAGS)
        except UsageError as e:
            raise app.UsageError(str(e)) from e
        return status if isinstance(status, int) else 0

    def parse_flags(argv: Sequence[str]) -> list[str]:
        try:
            return app.parse_flags_with_usage(argv)
        except (AttributeError, KeyError) as e:
            msg = _unknown_override(argv, e)
            if msg is None:
                raise
            sys.stderr.write(f"FATAL Flags parsing error: {msg}\nPass --helpshort or --helpfull to see help on "
                             "flags.\n")
            sys.exit(1)

    app.run(entry, flags_parser=parse_flags)

"""The command lines ``fastpair-train`` and ``fastpair-probe`` (pyproject.toml's console scripts).

Each parses and checks its options first, with nothing imported but ``config`` (the standard library): torch
takes seconds to import and the kit with scikit-learn more, so ``--help``, an unknown option and a bad value
answer at once. Only then is ``fastpair.training.experiment`` (torch, the kit) imported to do the work.

An error ends the command with one line ``PROG: error: ...`` on stderr and exit status 2 (argparse's errors
too: ``config.parser``); ``--help`` prints and exits 0. ``torchrun -m fastpair.training.train`` runs ``main``.
"""

from __future__ import annotations

import sys

from .config import TrainError, parse_command, parse_probe


def fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def _run(prog: str, parse, body: str, argv) -> int:
    """Parse ``argv`` (torch-free), then import the experiment and call its function ``body`` on the result."""
    try:
        parsed = parse(argv)
    except TrainError as err:
        return fail(prog, err)
    from . import experiment  # torch and the kit: only once the command line is known to be good
    from .data import DataError

    try:
        experiment.require_train_extra(prog)
        getattr(experiment, body)(parsed)
    except (TrainError, DataError) as err:
        return fail(prog, err)
    return 0


def main(argv=None) -> int:
    """``fastpair-train``: train, run the baselines and the probe. Returns the exit status."""
    return _run("fastpair-train", parse_command, "train_and_probe", argv)


def probe_main(argv=None) -> int:
    """``fastpair-probe --run DIR [--data PATH]``: the probe again on a finished run. Returns the exit status."""
    return _run("fastpair-probe", parse_probe, "probe_run", argv)


if __name__ == "__main__":
    raise SystemExit(main())

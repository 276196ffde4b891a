"""How a script runs: :func:`run_script` (parse, set up the runtime, train, leave the process
group, release the run folders) and :func:`setup_runtime` (a :class:`common.runtime.Runtime` from
the flags)."""
from __future__ import annotations

import sys

from common.declare import options_from
from common.distributed import init_distributed, is_collective_failure, launched_by_torchrun, lost_rank_error, shutdown
from common.errors import UserError
from common.runtime import AMP_DTYPES, Runtime, RuntimeOptions, resolve_device, set_deterministic, set_seed
from engine.resume import release_run_folders


def run_script(parse_option, train, argv: list[str] | None):
    """A training script's body: parse the flags, set up the :class:`Runtime` (joining torchrun's
    process group, if any), ``train(opt, runtime)``, and leave the process group at the end.
    Under torchrun, a collective that fails (another rank stopped answering for
    ``--dist_timeout`` minutes, or ended) raises :class:`common.distributed.RankLost`, whose one
    line names the rank(s) that stopped."""
    opt = parse_option(argv)
    opt.command = list(sys.argv[1:] if argv is None else argv)  # the flags as given, for results.json
    runtime = setup_runtime(opt)
    try:
        result = train(opt, runtime)
    except Exception as err:
        if runtime.dist.enabled and is_collective_failure(err):
            # the group is broken: no orderly shutdown (it could wait on the lost rank again)
            raise lost_rank_error(err, runtime.dist_timeout) from None
        shutdown()
        raise
    except BaseException:
        shutdown()
        raise
    finally:
        release_run_folders()  # the process may go on (a test, a sweep in one process)
    shutdown()
    return result


def setup_runtime(opt) -> Runtime:
    """Device, process group, determinism and seeds of a run, from its flags (:class:`RuntimeOptions`
    and ``--seed``)."""
    o = options_from(RuntimeOptions, opt)
    device = resolve_device(o.device)
    if o.sync_bn and not launched_by_torchrun():
        print("note: --sync_bn has no effect in a single process (launch with torchrun)", flush=True)
    info, device = init_distributed(device, o.dist_timeout)
    if o.amp not in AMP_DTYPES:
        raise UserError(f"unknown --amp '{o.amp}': use off, bf16 or fp16")
    if o.amp == "fp16" and device.type == "cpu":
        print("note: --amp fp16 on the CPU is slow and meant for testing; bf16 is the CPU's format", flush=True)
    set_deterministic(o.deterministic, device)
    set_seed(opt.seed)
    return Runtime(device, o.amp, o.channels_last, o.compile, info, o.dist_timeout)

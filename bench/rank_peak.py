"""Run sort3d-depth in this process and append this rank's peak resident memory to a file
(bench_scale.py launches every MPI rank through this, then sums the ranks' peaks).

    mpirun -np 2 python bench/rank_peak.py PEAK_FILE -- --instack ... (sort3d-depth options)
"""

import resource
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    peak_file, argv = sys.argv[1], sys.argv[3:]
    from sort3ddepth.engine.cli import run
    from sort3ddepth.engine.parallel import world

    comm = world()

    def stop(signum, frame):  # a stopped run (bench_scale --timeout) still records its peak
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    code = 1
    try:
        code = run(argv, comm=comm)
    finally:
        _record(peak_file, comm.rank)
    sys.exit(code)


def _record(peak_file, rank):
    # VmHWM: this process's peak since exec (ru_maxrss would also count pages held between the
    # launcher's fork and exec)
    try:
        kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(peak_file, "a") as f:
        f.write(f"{rank} {kb}\n")


if __name__ == "__main__":
    main()

"""Run many invocations of the real scripts cheaply: import torch once, fork one child per probe.

Usage: python tests/helpers/probe_scripts.py probes.json results.json
probes.json: [{"script": "image_train.py", "argv": [...], "prelude": ""}, ...]. Each child runs
the optional `prelude` (Python source), then the script as
`__main__` (exactly as `python scripts/X.py argv...`) with stdout/stderr captured to files; the
results hold each probe's exit status, stdout and stderr.
"""

import json
import os
import runpy
import shutil
import sys
import tempfile

import torch  # noqa: F401 -- imported once here, inherited by every forked probe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_probe(script: str, argv: list, prelude: str = "") -> dict:
    # mkdtemp, not TemporaryDirectory: the child runs the exit handlers (atexit), which would
    # delete a TemporaryDirectory of the parent's.
    tmp = tempfile.mkdtemp()
    try:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        pid = os.fork()
        if pid == 0:  # child: become `python scripts/<script> argv...`
            code = 0
            try:
                os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT), 1)
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT), 2)
                path = os.path.join(ROOT, "scripts", script)
                sys.argv = [path, *argv]
                sys.path.insert(0, os.path.dirname(path))
                exec(prelude, {})  # e.g. patch os.fsync to fail as on a full disk
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 -- what python itself would print and return
                import traceback

                traceback.print_exc()
                code = 1
            import atexit

            atexit._run_exitfuncs()  # as interpreter exit would (e.g. releasing a run lock)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        with open(out) as f1, open(err) as f2:
            return {"script": script, "argv": argv, "rc": os.waitstatus_to_exitcode(status),
                    "stdout": f1.read(), "stderr": f2.read()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    with open(sys.argv[1]) as f:
        probes = json.load(f)
    results = [run_probe(p["script"], p["argv"], p.get("prelude", "")) for p in probes]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()

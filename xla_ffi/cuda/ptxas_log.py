"""Keeps ptxas's resource report of the CUDA kernels (registers, spills, stack per kernel and
architecture) as a file, so that tests can check it without compiling anything.

Two modes, both run by xla_ffi/cuda/CMakeLists.txt:
  ptxas_log.py COMPILER ARGS...        compiler launcher: runs the compile (which has
                                       --resource-usage), writes the "ptxas info" lines for
                                       object X (the -o argument) to X.ptxas and passes every
                                       other line through to stderr.
  ptxas_log.py --merge REPORT OBJ...   joins the objects' reports into REPORT.
"""

import subprocess
import sys


def _is_ptxas_line(line):
  # The report is "ptxas info : ..." lines, each kernel's spill line indented below them.
  return line.startswith("ptxas info") or "bytes stack frame" in line


def compile_and_log(cmd):
  proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
  lines = proc.stderr.splitlines(keepends=True)
  sys.stderr.write("".join(l for l in lines if not _is_ptxas_line(l)))
  if proc.returncode == 0 and "-o" in cmd:
    obj = cmd[cmd.index("-o") + 1]
    with open(obj + ".ptxas", "w") as f:
      f.write("".join(l for l in lines if _is_ptxas_line(l)))
  return proc.returncode


def merge(report, objects):
  with open(report, "w") as out:
    for obj in objects:
      with open(obj + ".ptxas") as f:
        out.write(f.read())


if __name__ == "__main__":
  if sys.argv[1] == "--merge":
    merge(sys.argv[2], sys.argv[3:])
  else:
    sys.exit(compile_and_log(sys.argv[1:]))

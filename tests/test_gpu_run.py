"""A dry run of .ci/gpu-run: every command it would run on a GPU machine is well-formed here.

GPU time is scarce, so a typo in that script (an unknown flag, a missing file) must fail CI
on a CPU machine, not a GPU run.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from jnat import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu-run"
STAGES = ["build", "import", "gputests", "suite", "sanitize", "bench", "tcbwd", "train",
          "torchtrain", "cpubench"]
DEFAULT_STAGES = ["build", "import", "gputests", "suite", "sanitize", "bench"]


def _dry_run(*stages):
  out = subprocess.run(["bash", str(SCRIPT), "--dry-run", *stages], capture_output=True,
                       text=True, check=True, env={**os.environ, "OUT": "/results"}).stdout
  commands = {}
  for line in out.splitlines():
    assert line.startswith("+ ["), line
    stage, command = line[3:].split("] ", 1)
    commands[stage] = shlex.split(command.replace("-m not gpu", "-m 'not gpu'"))
  return commands


@pytest.fixture(scope="module")
def commands():
  return _dry_run(*STAGES[:1], *STAGES[2:])


def _after(argv, marker):
  return argv[argv.index(marker) + 1:]


def test_script_parses_and_lists_every_stage(commands):
  subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
  assert list(commands) == STAGES
  assert list(_dry_run()) == DEFAULT_STAGES
  assert list(_dry_run("bench", "sanitize")) == ["bench", "sanitize"]


def test_every_stage_runs_a_program(commands):
  # Stages run under `timeout`, which takes programs, not shell functions.
  for stage, argv in commands.items():
    assert shutil.which(argv[0]), (stage, argv)


def test_results_stay_a_handful_of_files(commands):
  outputs = [a for argv in commands.values() for a in argv if a.startswith("/results")]
  assert outputs == ["/results/bench.json", "/results/torchtrain.json"]
  assert "/results" not in SCRIPT.read_text().split("--target", 1)[1].split("\n", 1)[0]


class Parsed(Exception):
  """Raised by a stand-in for bench.run: the command line parsed, nothing is timed."""


def test_bench_command_parses(commands, monkeypatch):
  seen = {}

  def fake_run(suite, repeats, **_):
    seen.update(suite=suite, repeats=repeats)
    raise Parsed

  monkeypatch.setattr(bench, "run", fake_run)
  with pytest.raises(Parsed):
    bench.main(_after(commands["bench"], "jnat.bench"))
  assert seen["suite"] == "gpu"


def test_pytest_commands_name_existing_tests(commands):
  for stage in ("gputests", "suite", "tcbwd"):
    args = _after(commands[stage], "pytest")
    paths = [a for a in args if a.startswith("tests")]
    assert paths and all((ROOT / p).exists() for p in paths), args


def test_train_command_parses(commands):
  args = _after(commands["train"], "train.py")
  code = ("import sys, train; from absl import flags; flags.FLAGS(sys.argv); "
          "c = train._CONFIG.value; print(flags.FLAGS.bench, c.global_batch_size, c.compute_dtype)")
  out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout
  assert out.split() == ["True", "128", "bfloat16"]


def test_torchtrain_command_names_known_flags(commands):
  argv = commands["torchtrain"]
  script = ROOT / argv[1]
  help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                             text=True, check=True).stdout
  for flag in (a for a in argv[2:] if a.startswith("--")):
    assert flag in help_text, flag


def test_require_gpu_turns_skips_into_failures(tmp_path):
  import conftest
  if conftest.has_gpu():
    pytest.skip("this machine has a GPU: gpu tests run for real")
  (tmp_path / "test_needs_gpu.py").write_text(
      "import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n  pass\n")
  run = lambda require: subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
       str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
      env={**os.environ, "PYTHONPATH": str(ROOT / "tests"), "JNAT_REQUIRE_GPU": require})
  skipped = run("0")
  assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
  required = run("1")
  assert required.returncode == 1 and "JNAT_REQUIRE_GPU=1" in required.stdout, required.stdout


def test_deadline_skips_stages_it_cannot_fit(tmp_path):
  """With too little of JNAT_GPU_DEADLINE left a stage is not started: it is reported as
  skipped (and fails the run) instead of being killed half-way with nothing written."""
  proc = subprocess.run(["bash", str(SCRIPT), "bench", "train"], capture_output=True, text=True,
                        env={**os.environ, "OUT": str(tmp_path), "JNAT_GPU_DEADLINE": "30",
                             "JNAT_GPU_LOGS": str(tmp_path / "logs")})
  assert proc.returncode == 1, proc.stdout + proc.stderr
  summary = (tmp_path / "summary.txt").read_text().split("\n")
  assert [line.split()[:2] for line in summary if line] == [["bench", "skipped"],
                                                            ["train", "skipped"]]


def test_cpubench_runs_the_cpu_bench_once_per_vector_path(tmp_path, monkeypatch):
  """The cpubench stage, run here with a stand-in for `python3 -m jnat.bench` that records
  how it was called: one call per path this CPU supports but the baseline, each pinned to
  two cores on the CPU platform, with arguments the real benchmark accepts."""
  import jnat
  paths = [i for i in jnat.cpu_info()["supported"] if i != "baseline"]
  if not paths or not {0, 1} <= os.sched_getaffinity(0) or not shutil.which("taskset"):
    pytest.skip("needs a vector path beyond the baseline, cores 0 and 1, and taskset")
  calls = tmp_path / "calls.jsonl"
  fake = tmp_path / "bin" / "python3"
  fake.parent.mkdir()
  fake.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "jnat.bench"]:
  with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(dict(isa=os.environ.get("JNAT_CPU_ISA"),
                            platforms=os.environ.get("JAX_PLATFORMS"),
                            cores=sorted(os.sched_getaffinity(0)), args=args[2:])) + "\\n")
  out = args[args.index("--out") + 1]
  with open(out.rsplit(".", 1)[0] + ".md", "w") as f:
    f.write("table of " + os.environ["JNAT_CPU_ISA"] + "\\n")
  sys.exit(0)
os.execv({sys.executable!r}, [{sys.executable!r}] + args)
""")
  fake.chmod(0o755)
  proc = subprocess.run(["bash", str(SCRIPT), "cpubench"], capture_output=True, text=True,
                        env={**os.environ, "OUT": str(tmp_path / "out"),
                             "JNAT_GPU_LOGS": str(tmp_path / "logs"),
                             "PATH": f"{fake.parent}:{os.environ['PATH']}"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  recorded = [json.loads(line) for line in calls.read_text().splitlines()]
  assert [c["isa"] for c in recorded] == paths
  assert all(c["platforms"] == "cpu" and c["cores"] == [0, 1] for c in recorded)
  assert (tmp_path / "out" / "cpubench.md").read_text() == "".join(
      f"table of {p}\n" for p in paths)
  seen = {}

  def fake_run(suite, repeats, only, **_):
    seen.update(suite=suite, only=only)
    raise Parsed

  monkeypatch.setattr(bench, "run", fake_run)
  with pytest.raises(Parsed):
    bench.main(recorded[0]["args"])
  assert seen == dict(suite="cpu", only=["jnat cpu"])

"""The container side, run locally without AWS: arguments too long for SageMaker travel in a file, the
previous run's state is restored into the output before the program starts, shipped modules are
importable, and every /opt/ml path lands under the local root."""

from __future__ import annotations

import json
import textwrap

from embedkit.aws.job import OutputSpec, Ref, RemoteProgram, prepare
from embedkit.aws.local import run_local
from embedkit.aws.settings import SageMakerSettings

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from helper_mod import VALUE

    out = sys.argv[-1]
    rc = json.load(open(os.environ["EMBEDKIT_RESOURCE_CONFIG"]))
    with open(os.path.join(out, "seen.json"), "w") as fh:
        json.dump({
            "argv": sys.argv[1:],
            "helper": VALUE,
            "host": rc["current_host"],
            "state_before_start": sorted(os.listdir(os.path.join(out, "_state"))),
        }, fh)
    """
)


def test_long_arguments_state_and_modules_reach_the_program(tmp_path):
    (tmp_path / "helper_mod").mkdir()
    (tmp_path / "helper_mod" / "__init__.py").write_text("VALUE = 42\n")
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    final = tmp_path / "final"
    (final / "_state").mkdir(parents=True)
    (final / "_state" / "job.json").write_text("{}")  # a previous run's state
    long_value = "v" * 300  # over SageMaker's 256 characters per argument
    program = RemoteProgram(
        program=str(script),
        arguments=["--x", long_value, Ref("output", "out")],
        outputs=[OutputSpec("out", str(final), resume_subdir="_state")],
        dependencies={"helper": str(tmp_path / "helper_mod")},
    )
    job = prepare(program, SageMakerSettings.build({"run": "local"}, environ={}), local=True)
    assert job.spec.arguments == []  # they travel in arguments.json instead
    assert json.loads(job.code_files["arguments.json"]) == [
        "script/job.py",
        "--x",
        long_value,
        "/opt/ml/processing/output/out",
    ]
    assert run_local(job) == 0
    seen = json.loads((final / "seen.json").read_text())
    assert seen["argv"][:2] == ["--x", long_value]
    assert (
        seen["argv"][2].endswith("/opt/ml/processing/output/out")
        and seen["argv"][2] != "/opt/ml/processing/output/out"
    )
    assert seen["helper"] == 42 and seen["host"] == "algo-1"
    assert seen["state_before_start"] == ["job.json"]  # restored from the output before the program ran

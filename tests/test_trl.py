"""The user story: stock TRL SFTTrainer with torch_compile_backend="fxfuse", no `import fxfuse`."""
import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("mode", ["no-ckpt", "ckpt"])
def test_sft_trainer_with_fxfuse_backend_without_importing_fxfuse(mode):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, os.path.join(HERE, "trl_sft_run.py"), mode], capture_output=True,
                       text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["counts"].get("rms_norm") == 3, res  # 2 per layer + the final norm
    assert len(res["losses"]) == 3 and all(math.isfinite(l) for l in res["losses"])

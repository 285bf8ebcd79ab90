"""What `import nanoengine` loads: the runtime, not the tools that only some commands need."""

from __future__ import annotations

import subprocess
import sys

LOADED_ONLY_WHEN_USED = ("gguf", "nanoengine.weights.convert", "nanoengine.weights.convert_gemma", "nanoengine.weights.convert_common",
                         "nanoengine.server.app", "nanoengine.server.common", "nanoengine.research.plots",
                         "fastapi", "uvicorn", "jinja2", "transformers", "matplotlib", "ray", "lm_eval")  # fmt: skip


def test_import_nanoengine_loads_no_converter_no_server_no_template_engine():
    check = f"import sys, nanoengine; print(sorted(m for m in {LOADED_ONLY_WHEN_USED!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

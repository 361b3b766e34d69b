"""Install commands, built from the one place that pins versions: the extras of pyproject.toml.

`install("gptq")` is the command every message prints; `python -m compress.extras gptq` prints the
pinned requirements alone (the Makefile installs from it).
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

FLAGS = {  # extra: (environment, pip options) its install needs
    "gptq": ("BUILD_CUDA_EXT=0 ", "--no-build-isolation "),  # an sdist whose build imports torch; no CUDA kernels
    "llamacpp": ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF" ', ""),
    "assets": ("", "--no-deps "),  # data packages: their own dependencies are not needed
}
ONNX = ("optimum", "optimum-onnx", "onnxruntime", "onnx", "onnx-ir")
"""The ONNX stack is a core dependency; a message that needs it names these of the core pins."""


def _requirements() -> list[str]:
    try:
        return metadata.requires("compress") or []
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        import tomllib

        project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
        return project["dependencies"] + [f'{r}; extra == "{e}"' for e, rs in
                                          project["optional-dependencies"].items() for r in rs]


def pins(extra: str) -> list[str]:
    """The requirement strings of an extra (`onnx`: those core requirements of the ONNX stack)."""
    out = []
    for req in _requirements():
        spec, _, marker = req.partition(";")
        name = re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()
        if extra == "onnx" and not marker and name in ONNX:
            out.append(spec.strip())
        elif marker and re.search(rf'extra\s*==\s*"{re.escape(extra)}"', marker):
            out.append(spec.strip())
    return out


def install(extra: str) -> str:
    """The pip command that installs an extra as it was tested."""
    env, options = FLAGS.get(extra, ("", ""))
    return f"{env}pip install {options}" + " ".join(f"'{p}'" if re.search(r"[<>]", p) else p for p in pins(extra))


if __name__ == "__main__":
    print(" ".join(pins(sys.argv[1])))

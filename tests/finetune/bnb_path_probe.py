"""Run the quantized-gradient comparison under one bitsandbytes kernel path; print one JSON line.

    python tests/finetune/bnb_path_probe.py native | avx2 | no-native-library

`avx2` needs ATEN_CPU_CAPABILITY=avx2 in the environment (torch reads it at import): bitsandbytes'
AVX-512 branches (int8 through torch._int_mm, its AVX-512 dequantize choices) are then off.
`no-native-library` refuses to load libbitsandbytes_cpu, so bitsandbytes registers only its
pure-PyTorch kernels, as on a platform without a build. Both must be set before anything
imports torch or bitsandbytes, hence this separate script.
"""

import ctypes
import json
import sys

PATH = sys.argv[1] if len(sys.argv) > 1 else "native"
if PATH == "no-native-library":
    _load = ctypes.cdll.LoadLibrary

    def _refuse(name, *args, **kwargs):
        if "libbitsandbytes" in str(name):
            raise OSError(f"{name}: refused to force bitsandbytes' pure-PyTorch fallback")
        return _load(name, *args, **kwargs)

    ctypes.cdll.LoadLibrary = _refuse
elif PATH not in ("native", "avx2"):
    raise SystemExit(f"unknown path {PATH!r}; expected native, avx2 or no-native-library")

import torch  # noqa: E402
import bitsandbytes.backends.cpu.ops as cpu_ops  # noqa: E402
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib  # noqa: E402

from finetune.quantized_grads import compare  # noqa: E402

native = not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
if native:
    from bitsandbytes.functional import has_avx512bf16
taken = {
    "path": PATH,
    "torch_capability": torch.backends.cpu.get_cpu_capability(),
    "bnb_avx512": bool(cpu_ops._has_avx512),
    "native_library": native,
    "avx512bf16": bool(has_avx512bf16()) if native else False,
}
torch.set_num_threads(1)
print(json.dumps({**taken, "rows": [compare(mode) for mode in ("nf4", "int8")]}))

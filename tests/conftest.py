"""Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors. TRITON_INTERPRET is read when a
kernel is decorated, so it is set here, before any test module imports spaceserve.

Engines in tests run their core in this process by default (their internals are inspected, and a process per
engine would dominate the suite's time on two cores); tests of the process split ask for multiprocess=True."""

import os

import torch

os.environ.setdefault("SPACESERVE_ENABLE_MULTIPROCESSING", "0")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:
        _interpreter = None

    if _interpreter is not None and hasattr(_interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter turns a scalar loaded from memory (a 1-element array) into a loop bound with
        # int(array), which NumPy >= 2.3 refuses for arrays that are not 0-d; .item() takes any 1-element array.
        _patch_lang_tensor = _interpreter._patch_lang_tensor

        def _patch_lang_tensor_with_item(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        _interpreter._patch_lang_tensor = _patch_lang_tensor_with_item

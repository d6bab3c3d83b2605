import os

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The switch is
# read when a kernel is decorated, so it must be set before kernels.py is first imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

"""Set up before any test module: Triton's interpreter where there is no GPU, and the fixtures the
post-training tests share (test_posttrain, test_dpo_merge), each built once per run."""
import os

import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The switch is
# read when a kernel is decorated, so it must be set before kernels.py is first imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("PLAMO2_QUIET", "1")  # no progress lines in the tests' output

import pytest  # noqa: E402

import released as released_layout  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from plamo2 import PLaMo2, PLaMo2Config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

from test_train import SMALL_RUN  # noqa: E402

WORLD = ["--world-people", "30", "--heldout-frac", "0.3"]


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "run")
    train.main(SMALL_RUN + WORLD + ["--out", out, "--max-steps", "2", "--eval-every", "2"])
    return os.path.join(out, "ckpt")


@pytest.fixture(scope="session")
def data(base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "data")
    tasks.main(["data", "--ckpt", base, "--out", out, "--examples", "400", "--eval-per-cell", "6"])
    return out


@pytest.fixture(scope="session")
def world(base):
    w, c = tasks.load_world(base)
    return w, c


@pytest.fixture(scope="session")
def released(tmp_path_factory):
    """A checkpoint directory in the released PLaMo 2 layout, at small shapes (tests/released.py)."""
    return released_layout.write(str(tmp_path_factory.mktemp("released") / "plamo-2-tiny"))


@pytest.fixture(scope="session")
def user(tmp_path_factory):
    """The user's own text, conversations, pairs and evaluation set."""
    return released_layout.user_data(str(tmp_path_factory.mktemp("user")))


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    cfg = PLaMo2Config.from_preset("tiny", vocab_size=300, hidden_size=64, intermediate_size=96, mamba_num_heads=2,
                                   num_attention_heads=2, num_key_value_heads=1, hidden_size_per_head=32,
                                   mamba_d_state=8, mamba_chunk_size=8, attention_window_size=16)
    return PLaMo2(cfg).eval(), tok

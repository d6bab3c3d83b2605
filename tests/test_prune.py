"""Pruning: every cut equals the unpruned model with the removed channels silenced, and the plan
keeps what the statistics rank highest, within the constraints of the config."""
import os

import pytest
import torch

import prune
import train
from plamo2 import PLaMo2, PLaMo2Config

from test_train import SMALL_RUN

CFG = dict(vocab_size=300, hidden_size=128, intermediate_size=96, mamba_num_heads=4, num_attention_heads=4,
           num_key_value_heads=2, hidden_size_per_head=32, mamba_d_state=8, mamba_chunk_size=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = PLaMo2(PLaMo2Config.from_preset("tiny", **CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():  # away from the init's ones and zeros, so that every tensor matters
            p += 0.05 * torch.randn_like(p)
    return m


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))


def silenced(model, idx, silence):
    """Logits of a copy of model after silence(copy) zeroes what a cut removes."""
    ref = PLaMo2(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        silence(ref)
        return ref(idx)[0]


def others(n, kept):
    return sorted(set(range(n)) - set(torch.as_tensor(kept).tolist()))


@torch.no_grad()
def test_cutting_mlp_neurons_equals_zeroing_their_down_proj_columns(model, idx):
    keep = {i: torch.tensor([0, 5, 7, 20, 33, 50, 60, 90]) + i for i in range(4)}
    pruned = prune.cut(model, {"mlp": keep})

    def silence(ref):
        for i, f in keep.items():
            ref.layers[i].mlp.down_proj.weight[:, others(96, f)] = 0
    torch.testing.assert_close(pruned(idx)[0], silenced(model, idx, silence), atol=1e-5, rtol=1e-5)
    assert pruned.config.intermediate_size == 8
    for bad in (torch.tensor([0, 96]), torch.tensor([3, 3])):
        with pytest.raises(ValueError, match="intermediate_size"):
            prune.cut(model, {"mlp": {0: bad}})


@torch.no_grad()
def test_cutting_mamba_heads_equals_zeroing_their_x(model, idx):
    """A head's x feeds its own scan and, through bcdt_proj, every head's B, C and Δ: with its x
    zero (before the conv) it contributes nothing anywhere, which is what removing it means."""
    keep = {0: torch.tensor([3, 1]), 2: torch.tensor([0, 2])}
    pruned = prune.cut(model, {"mamba": keep})
    P = model.config.hidden_size_per_head

    def silence(ref):
        for i, h in keep.items():
            for head in others(4, h):  # in_proj rows are [z_h | x_h] per head
                ref.layers[i].mixer.in_proj.weight[head * 2 * P + P:(head + 1) * 2 * P] = 0
    torch.testing.assert_close(pruned(idx)[0], silenced(model, idx, silence), atol=1e-5, rtol=1e-5)
    assert pruned.config.mamba_num_heads == 2


@torch.no_grad()
def test_cutting_attention_heads_keeps_gqa_valid(model, idx):
    # layer 1 keeps kv group 1 with its q heads in the other order; layer 3 keeps group 0
    keep = {1: (torch.tensor([1]), torch.tensor([3, 2])), 3: (torch.tensor([0]), torch.tensor([1, 0]))}
    pruned = prune.cut(model, {"attn": keep})
    P = model.config.hidden_size_per_head

    def silence(ref):
        for i, (_, q) in keep.items():
            for head in others(4, q):
                ref.layers[i].mixer.o_proj.weight[:, head * P:(head + 1) * P] = 0
    torch.testing.assert_close(pruned(idx)[0], silenced(model, idx, silence), atol=1e-5, rtol=1e-5)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    # two kv groups with their q heads interleaved in the list: still each q head with its own group
    pruned = prune.cut(model, {"attn": {1: (torch.tensor([1, 0]), torch.tensor([0, 3])),
                                        3: (torch.tensor([0, 1]), torch.tensor([2, 1]))}})

    def silence(ref):
        for i, q in ((1, [0, 3]), (3, [2, 1])):
            for head in others(4, q):
                ref.layers[i].mixer.o_proj.weight[:, head * P:(head + 1) * P] = 0
    torch.testing.assert_close(pruned(idx)[0], silenced(model, idx, silence), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same number in each kept kv group"):
        prune.cut(model, {"attn": {1: (torch.tensor([0]), torch.tensor([0, 2])), 3: (torch.tensor([0]), torch.tensor([0, 1]))}})


@torch.no_grad()
def test_cutting_layers_equals_skipping_them_and_keeps_the_pattern(model, idx):
    pruned = prune.cut(model, {"layers": [2, 3]})
    torch.testing.assert_close(pruned(idx)[0], silenced(model, idx, lambda ref: setattr(ref, "layers", ref.layers[2:])),
                               atol=1e-5, rtol=1e-5)
    assert [b.is_mamba for b in pruned.layers] == [True, False]
    with pytest.raises(ValueError, match="whole groups of mamba_step=2"):
        prune.cut(model, {"layers": [1, 2]})


@torch.no_grad()
def test_hidden_channels_are_cut_alike_everywhere(model, idx):
    """Every hidden channel in a new order, none removed: the same function (the norms' means do
    not depend on the order). A subset is then just fewer of them, through the same indexing."""
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prune.cut(model, {"hidden": perm})(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)
    small = prune.cut(model, {"hidden": perm[:64]})
    assert small.config.hidden_size == 64 and torch.isfinite(small(idx)[0]).all()
    with pytest.raises(ValueError, match="Δ rank"):  # hidden 2048 -> 1024 at the released shapes
        prune.cut(PLaMo2(PLaMo2Config.from_preset("tiny", **{**CFG, "hidden_size": 2048})), {"hidden": torch.arange(1024)})


def test_the_plan_keeps_the_highest_scores_within_the_rules(model, idx):
    scores = prune.calibrate(model, [idx[:1], idx[1:]])
    assert [s is None for s in scores["attn"]] == [True, False, True, False]
    assert scores["mlp"][0].shape == (96,) and scores["mamba"][0].shape == (4,) and scores["hidden"].shape == (128,)
    # the MLP score by hand: L2 over windows of the sequence-mean |input of down_proj|
    block, acts = model.layers[0], []
    h = block.register_forward_hook(lambda m, a, out: acts.append(a[0]))
    with torch.no_grad():
        for w in (idx[:1], idx[1:]):
            model(w)
    h.remove()
    with torch.no_grad():
        x = [a + block.post_mixer_norm(block.mixer(block.pre_mixer_norm(a))) for a in acts]
        inner = [block.mlp.gate_up_proj(block.pre_mlp_norm(a)).chunk(2, -1) for a in x]
        by_hand = torch.stack([(torch.nn.functional.silu(g) * u).abs().mean((0, 1)) for g, u in inner]).norm(dim=0)
    torch.testing.assert_close(scores["mlp"][0], by_hand, atol=1e-5, rtol=1e-4)

    keep = prune.plan(scores, model.config, {"intermediate_size": 10, "num_attention_heads": 2,
                                             "num_key_value_heads": 1, "mamba_num_heads": 3, "hidden_size": 100})
    assert torch.equal(keep["mlp"][0], torch.sort(torch.topk(scores["mlp"][0], 10).indices).values)
    kv, q = keep["attn"][1]
    groups = scores["attn"][1].view(2, 2)
    assert kv.tolist() == [int(groups.sum(1).argmax())] and sorted(q.tolist()) == [kv.item() * 2, kv.item() * 2 + 1]
    assert prune.cut(model, keep).num_params() < model.num_params()
    depth = prune.plan(scores, model.config, {"num_hidden_layers": 2})
    assert depth["layers"] in ([0, 1], [2, 3]) and len(set(depth["layers"])) == 2
    for bad, message in [({"num_hidden_layers": 3}, "multiple of mamba_step"), ({"num_attention_heads": 3}, "cannot share"),
                         ({"intermediate_size": 97}, "from 1 to the model's 96")]:
        with pytest.raises(ValueError, match=message):
            prune.plan(scores, model.config, bad)
    rand = prune.random_scores(scores, 0)
    assert rand["mlp"][0].shape == (96,) and not torch.equal(rand["mlp"][0], scores["mlp"][0])


def test_prune_from_the_command_line(tmp_path, capsys):
    src = str(tmp_path / "base")
    train.main(SMALL_RUN + ["--out", src, "--max-steps", "1", "--eval-every", "1"])
    ckpt, out, scores = os.path.join(src, "ckpt"), str(tmp_path / "pruned"), str(tmp_path / "scores.pt")
    prune.main(["--ckpt", ckpt, "--out", out, "--intermediate-size", "256", "--mamba-num-heads", "4",
                "--calib-samples", "4", "--seq-len", "32", "--scores", scores])
    model, tok = train.load_checkpoint(out, "cpu")  # an ordinary checkpoint: it loads and runs
    assert model.config.intermediate_size == 256 and model.config.mamba_num_heads == 4 and os.path.exists(scores)
    assert torch.isfinite(model(torch.tensor([tok.encode("佐藤は")]))[0]).all()
    prune.main(["--ckpt", ckpt, "--out", out + "-depth", "--num-hidden-layers", "2", "--scores", scores])
    assert "scores: read" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prune.main(["--ckpt", ckpt, "--out", out, "--num-hidden-layers", "2"])  # never over an existing directory
    assert "already exists" in capsys.readouterr().err

"""Pruning: every cut equals the unpruned model with the removed channels silenced, and the plan
keeps what the statistics rank highest, within the constraints of the config."""
import os
import shutil

import pytest
import torch

import prune
import runs
import train
from plamo2 import PLaMo2, PLaMo2Config
from tokenizer import Tokenizer

from test_train import SMALL_RUN, torchrun

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


def test_pruning_to_the_full_size_changes_nothing(model, idx):
    scores = prune.calibrate(model, [idx[:1]])
    full = prune.cut(model, prune.plan(scores, model.config, {}))
    assert vars(full.config) == vars(model.config)
    torch.testing.assert_close(full(idx)[0], model(idx)[0], atol=0, rtol=0)


@torch.no_grad()
def test_channels_with_zero_importance_by_construction_are_cut_and_change_nothing(model, idx):
    """Calibrate, plan and cut end to end on a model where some neurons and heads produce exactly
    zero: they score zero, the plan drops exactly them, and the logits stay the same."""
    m = PLaMo2(model.config).eval()
    m.load_state_dict(model.state_dict())
    P = m.config.hidden_size_per_head
    dead_mlp, dead_mamba, dead_group = [3, 10, 50], [1], 0
    for i, block in enumerate(m.layers):
        for f in dead_mlp:  # gate and up rows zero: silu(0) * 0 = 0 into down_proj
            block.mlp.gate_up_proj.weight[[f, 96 + f]] = 0
        if block.is_mamba:
            for h in dead_mamba:  # its x zero: nothing into its scan, B, C or Δ
                block.mixer.in_proj.weight[h * 2 * P + P:(h + 1) * 2 * P] = 0
        else:  # kv group 0's values zero: its two q heads put zeros into o_proj
            block.mixer.qkv_proj.weight[(4 + 2 + dead_group) * P:(4 + 2 + dead_group + 1) * P] = 0
    scores = prune.calibrate(m, [idx[:1], idx[1:]])
    assert all(scores["mlp"][i][dead_mlp].eq(0).all() for i in range(4))
    assert scores["mamba"][0][dead_mamba].eq(0).all() and scores["attn"][1][:2].eq(0).all()
    keep = prune.plan(scores, m.config, {"intermediate_size": 93, "mamba_num_heads": 3, "num_key_value_heads": 1,
                                         "num_attention_heads": 2})
    assert keep["attn"][1][0].tolist() == [1] and 1 not in keep["mamba"][0].tolist()
    torch.testing.assert_close(prune.cut(m, keep)(idx)[0], m(idx)[0], atol=1e-5, rtol=1e-5)


def test_the_delta_rank_is_cut_with_the_hidden_size_at_the_released_shapes():
    """hidden 2048 -> 1024 takes the Δ rank max(64, hidden/16) from 128 to 64 (1b's hidden size
    with a small rest): the Δ channels kept are the best by their own scores, and each kept
    head's z, x, conv, bcdt_proj columns, dt_proj row, dt_bias, A_log, D and out_proj columns
    stay together."""
    torch.manual_seed(0)
    cfg = PLaMo2Config.from_preset("tiny", **{**CFG, "hidden_size": 2048, "intermediate_size": 64,
                                              "num_hidden_layers": 2})
    big = PLaMo2(cfg).eval()
    with torch.no_grad():
        for p in big.parameters():
            p += 0.05 * torch.randn_like(p)
    w = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    scores = prune.calibrate(big, [w])
    assert scores["dt"][0].shape == (128,) and scores["dt"][1] is None
    keep = prune.plan(scores, cfg, {"hidden_size": 1024, "mamba_num_heads": 2})
    small = prune.cut(big, keep)
    assert small.layers[0].mixer.R == 64 and torch.isfinite(small(w)[0]).all()
    dt, h, x = keep["dt"][0], keep["mamba"][0], keep["hidden"]
    assert torch.equal(dt, torch.sort(torch.topk(scores["dt"][0], 64).indices).values)
    a, b, P, N = big.layers[0].mixer, small.layers[0].mixer, 32, 8
    ch = (h[:, None] * P + torch.arange(P)).reshape(-1)
    zx = (h[:, None] * 2 * P + torch.arange(2 * P)).reshape(-1)
    assert torch.equal(b.in_proj.weight, a.in_proj.weight[zx][:, x])
    assert torch.equal(b.conv1d.weight, a.conv1d.weight[ch])
    assert torch.equal(b.bcdt_proj.weight, a.bcdt_proj.weight[torch.cat([torch.arange(2 * N), 2 * N + dt])][:, ch])
    assert torch.equal(b.dt_proj.weight, a.dt_proj.weight[h][:, dt])
    assert torch.equal(b.dt_norm_weight, a.dt_norm_weight[dt])
    for n in ("dt_bias", "A_log", "D"):
        assert torch.equal(getattr(b, n), getattr(a, n)[h])
    assert torch.equal(b.out_proj.weight, a.out_proj.weight[x][:, ch])
    with pytest.raises(ValueError, match="Δ rank .* becomes 64"):
        prune.cut(big, {**keep, "dt": {}})


def test_pruning_1b_on_the_meta_device():
    with torch.device("meta"):
        big = PLaMo2(PLaMo2Config.from_preset("1b"))
    cfg = big.config
    scores = {"layer": torch.rand(cfg.num_hidden_layers), "hidden": torch.rand(cfg.hidden_size),
              "mlp": [torch.rand(cfg.intermediate_size)] * cfg.num_hidden_layers,
              "mamba": [torch.rand(cfg.mamba_num_heads) if cfg.is_mamba(i) else None for i in range(cfg.num_hidden_layers)],
              "dt": [torch.rand(128) if cfg.is_mamba(i) else None for i in range(cfg.num_hidden_layers)],
              "attn": [None if cfg.is_mamba(i) else torch.rand(cfg.num_attention_heads) for i in range(cfg.num_hidden_layers)]}
    targets = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
               "num_attention_heads": cfg.num_attention_heads // 2, "mamba_num_heads": cfg.mamba_num_heads // 2}
    small = prune.cut(big, prune.plan(scores, cfg, targets))
    for k, v in targets.items():
        assert getattr(small.config, k) == v
    assert all(p.is_meta for p in small.parameters())
    with torch.device("meta"):  # the shapes are exactly those of a model built from the new config
        fresh = PLaMo2(small.config)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}


def test_the_kl_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    h, w = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(11, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    for T in (1.0, 2.0):
        t = h @ w.T                                                      # the teacher's logits
        p_t = torch.softmax(t / T, -1)
        by_hand = T * T * (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1)[mask].sum()
        (expected,) = torch.autograd.grad(by_hand, s)
        got = prune.KLDivergence.apply(s.flatten(0, 1), h.flatten(0, 1), w, mask.flatten().double(), T, 3)  # chunks of 3 rows
        (grad,) = torch.autograd.grad(3 * got, s)
        torch.testing.assert_close(got.double(), by_hand, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, 3 * expected, atol=1e-6, rtol=1e-5)  # computed in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under --dtype bfloat16: bf16 logits, fp32 sum
        s16 = s.detach().bfloat16().requires_grad_()
        got = prune.kl_divergence(s16, h.float(), w.float(), mask, 2.0)
        got.backward()
    assert got.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), by_hand, atol=0.05, rtol=0.02)
    torch.testing.assert_close(s16.grad.double(), expected, atol=0.01, rtol=0.05)
    s1 = torch.zeros(1, 2, 11)  # equal distributions: nothing to learn
    assert prune.kl_divergence(s1, torch.zeros(1, 2, 3), torch.randn(11, 3, generator=g), torch.ones(1, 2)).item() < 1e-6


def test_distillation_moves_the_student_only(model, idx):
    teacher = PLaMo2(model.config)
    teacher.load_state_dict(model.state_dict())
    student = prune.cut(teacher, {"mlp": {i: torch.arange(48) for i in range(4)}})  # as main does
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    storage = lambda m: {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert not storage(student) & storage(teacher)
    tokens = torch.randint(0, 264, (400,), generator=torch.Generator().manual_seed(3)).numpy().astype("uint16")
    tok = Tokenizer({bytes([b]): b for b in range(256)})  # 264 ids with its special tokens
    stage = prune.Distillation(teacher, 0.7, 1.0, tok, tokens, tokens, 39, 0, None)
    loss, n, parts = stage.loss(student, (idx[:, :-1], idx[:, 1:]))
    torch.testing.assert_close(loss, 0.7 * parts["kl"] + 0.3 * parts["ce"])
    assert n == idx[:, 1:].numel() and parts["kl"] > 0
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items() if k in before)
    # the teacher's hidden states and head give its own logits, and the teacher is the caller's, unchanged
    with torch.no_grad():
        torch.testing.assert_close(stage.teacher(idx, head=False)[0] @ teacher.lm_head.weight.T, model(idx)[0])
        torch.testing.assert_close(teacher(idx)[0], model(idx)[0])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("teacher") / "base")
    train.main(SMALL_RUN + ["--out", src, "--max-steps", "1", "--eval-every", "1"])
    return os.path.join(src, "ckpt")


@pytest.mark.slow
def test_prune_from_the_command_line(teacher_ckpt, tmp_path, capsys):
    ckpt, out, scores = teacher_ckpt, str(tmp_path / "pruned"), str(tmp_path / "scores.pt")
    torch.save(prune.calibrate(PLaMo2(PLaMo2Config.from_preset("tiny", **CFG)), [torch.zeros(1, 4, dtype=torch.long)]),
               tmp_path / "other.pt")  # the statistics of another model
    prune.main(["--ckpt", ckpt, "--out", out, "--intermediate-size", "256", "--mamba-num-heads", "4",
                "--calib-samples", "4", "--scores", scores])
    printed = capsys.readouterr().out
    assert "scores: 4 windows of 64 tokens" in printed and "before distillation: val_bpb" in printed
    model, tok = runs.load_checkpoint(os.path.join(out, "pruned"), "cpu")  # an ordinary checkpoint: it loads and runs
    assert model.config.intermediate_size == 256 and model.config.mamba_num_heads == 4 and os.path.exists(scores)
    assert torch.isfinite(model(torch.tensor([tok.encode("佐藤は")]))[0]).all()
    hf = PLaMo2.from_hf(os.path.join(out, "pruned"))  # the Hugging Face layout, round trip
    hf.save_hf(str(tmp_path / "again"))
    again = PLaMo2.from_hf(str(tmp_path / "again"))
    assert vars(again.config) == vars(model.config)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert not os.path.exists(os.path.join(out, "ckpt"))  # --distill-steps 0: the cut only
    with pytest.raises(SystemExit):
        prune.main(["--ckpt", ckpt, "--out", out, "--num-hidden-layers", "2"])  # never over an existing directory
    assert "holds a run already (pruned)" in capsys.readouterr().err
    released = str(tmp_path / "no-lineage")  # an export or a released model: no record of its text
    shutil.copytree(os.path.join(out, "pruned"), released)
    os.remove(os.path.join(released, "lineage.json"))
    for bad, message in [(["--ckpt", ckpt, "--out", os.path.join(ckpt, "sub")], "lies inside --ckpt"),
                         (["--ckpt", ckpt, "--out", out + "-x", "--scores", str(tmp_path / "other.pt")],
                          "does not hold the statistics of this model"),
                         (["--ckpt", str(tmp_path / "none"), "--out", out + "-x"], "no checkpoint directory"),
                         (["--ckpt", released, "--out", out + "-x"], "give --data")]:
        with pytest.raises(SystemExit):
            prune.main(bad)
        assert message in capsys.readouterr().err

    # distillation through the shared loop: settings from the teacher's run, a fifth of its lr,
    # and a resume that continues exactly where it stopped
    depth = ["--ckpt", ckpt, "--num-hidden-layers", "2", "--scores", scores, "--distill-steps", "4", "--eval-every", "2"]
    prune.main(depth + ["--out", out + "-a"])
    printed = capsys.readouterr().out
    assert "scores: read" in printed and "kl " in printed and "step 4: val_bpb" in printed
    loop = runs.read_lineage(os.path.join(out + "-a", "ckpt"))["loop"]
    assert loop["lr"] == pytest.approx(3e-3 / 5) and loop["seq_len"] == 64
    prune.main(["--ckpt", os.path.join(out + "-a", "ckpt"), "--out", out + "-a2", "--intermediate-size", "128",
                "--calib-samples", "2"])  # a second round, on the data the first was distilled on
    assert runs.load_checkpoint(os.path.join(out + "-a2", "pruned"), "cpu")[0].config.intermediate_size == 128
    prune.main(depth + ["--out", out + "-b", "--stop-at-step", "2"])
    prune.main(["--out", out + "-b", "--resume"])
    assert "resuming" in capsys.readouterr().out
    a, _ = runs.load_checkpoint(os.path.join(out + "-a", "ckpt"), "cpu")
    b, _ = runs.load_checkpoint(os.path.join(out + "-b", "ckpt"), "cpu")
    assert a.config.num_hidden_layers == 2
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    prune.main(["--ckpt", ckpt, "--num-hidden-layers", "2", "--scores", scores, "--bench"])
    printed = capsys.readouterr().out
    assert "decode, batch 1: teacher" in printed and "distillation" in printed and "next-token loss only" in printed
    with pytest.raises(SystemExit):
        prune.main(["--out", out + "-b", "--resume", "--kd-weight", "0.5"])
    assert "differ" in capsys.readouterr().err


@pytest.mark.slow
def test_distillation_in_two_processes_matches_one(teacher_ckpt, tmp_path):
    args = ["--ckpt", teacher_ckpt, "--num-hidden-layers", "2", "--calib-samples", "4", "--distill-steps", "2",
            "--eval-every", "2"]
    prune.main(args + ["--out", str(tmp_path / "one")])
    torchrun(args + ["--out", str(tmp_path / "ddp")], 29536, script="prune.py")
    w1 = PLaMo2.from_hf(str(tmp_path / "one" / "ckpt")).state_dict()
    w2 = PLaMo2.from_hf(str(tmp_path / "ddp" / "ckpt")).state_dict()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)

"""nanogpt.optim and the training budgets: parameter groups, AdamW and Muon, cosine and WSD schedules by
iterations or by time, exact resume with Muon, --max_seconds, --target_val_loss and the closing line."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from nanogpt.checkpoint import load_checkpoint
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import build_optimizers, get_lr
from nanogpt.train import main as train_main
from nanogpt.train_options import TrainOptions


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32))


def test_adamw_decays_only_matrices_and_embeddings():
    model = tiny_model()
    (opt,) = build_optimizers(
        model, "adamw", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    adamw, muon = build_optimizers(model, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    assert isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")}
    assert "transformer.wte.weight" in in_adamw and not in_muon & in_adamw
    assert in_muon | in_adamw == set(names.values())
    x = torch.randint(32, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    for opt in (adamw, muon):
        opt.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def schedule(**overrides) -> SimpleNamespace:
    o = dict(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100, max_iters=100)
    o.update(lr_schedule="wsd", cooldown_frac=0.2, max_seconds=0.0)
    return SimpleNamespace(**{**o, **overrides})


def test_wsd_warms_up_holds_then_cools_down_linearly():
    o = schedule()
    lrs = [get_lr(it, o) for it in range(101)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert set(lrs[10:81]) == {1.0}  # stable until 80% of max_iters
    assert lrs[90] == pytest.approx(1.0 - 0.5 * 0.9) and lrs[100] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[80:100], lrs[81:101]))


def test_a_time_budget_places_the_cool_down_by_time():
    o = schedule(max_seconds=60.0, max_iters=10**9)
    assert get_lr(50, o, seconds=30.0) == 1.0  # half the budget: stable
    assert get_lr(50, o, seconds=54.0) == pytest.approx(0.55)  # half-way through the last 20%
    assert get_lr(50, o, seconds=60.0) == pytest.approx(0.1)  # the budget spent: cooled down
    cosine = schedule(max_seconds=60.0, max_iters=10**9, lr_schedule="cosine")
    assert get_lr(50, cosine, seconds=30.0) == pytest.approx(0.55) and get_lr(50, cosine, 60.0) == pytest.approx(0.1)


def test_cosine_by_iterations_is_nanogpts():
    o = TrainOptions(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(60, o) == 1e-4 + 0.5 * (1e-3 - 1e-4)  # exactly, not approximately: the seed runs depend on it


@pytest.mark.parametrize(
    "option", ["--optimizer=sgd", "--lr_schedule=linear", "--cooldown_frac=0", "--max_seconds=-1", "--milestones=a"]
)
def test_bad_budget_and_schedule_options_are_named(option, tiny_model_args, tmp_path):
    with pytest.raises(UserError, match=option.split("=")[0]):
        train_main([*tiny_model_args, f"--out_dir={tmp_path}", option])


def run(args, data_dir, out_dir, *extra):
    train_main([*args, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])


def test_muon_resume_is_bit_exact_and_the_optimizer_must_match(prepare_char_dataset, tiny_model_args, tmp_path):
    data_dir = prepare_char_dataset()
    common = ("--optimizer=muon", "--lr_schedule=wsd", "--eval_interval=4", "--learning_rate=1e-2", "--warmup_iters=1")
    run(tiny_model_args, data_dir, tmp_path / "straight", *common, "--max_iters=8")
    run(tiny_model_args, data_dir, tmp_path / "resumed", *common, "--max_iters=4")
    run(tiny_model_args, data_dir, tmp_path / "resumed", *common, "--max_iters=8", "--init_from=resume")
    a, b = load_checkpoint(tmp_path / "straight" / "ckpt.pt"), load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert "muon_optimizer" in a and a["iter_num"] == b["iter_num"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    with pytest.raises(UserError, match="trained with --optimizer=muon; resume with the same optimizer"):
        run(tiny_model_args, data_dir, tmp_path / "resumed", "--max_iters=12", "--init_from=resume")


def test_time_budget_ends_cooled_down_with_a_final_evaluation_and_resume_continues_it(
    prepare_char_dataset, tiny_model_args, tmp_path, capsys
):
    data_dir = prepare_char_dataset()
    budget = (
        "--lr_schedule=wsd",
        "--max_iters=1000000",
        "--eval_interval=1000000",
        "--log_interval=1000000",
        "--warmup_iters=5",
    )
    run(tiny_model_args, data_dir, tmp_path / "out", *budget, "--max_seconds=1.5")
    out = capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    # stopped by the budget (no wall-clock upper bound here: how long a step takes is a benchmark's business)
    assert ckpt["train_seconds"] >= 1.5 and 10 < ckpt["iter_num"] < 1000000
    steps = re.findall(r"^step (\d+): ", out, re.M)
    assert steps == ["0", str(ckpt["iter_num"])]  # the budget's last evaluation, at the iteration it stopped
    o = TrainOptions(**{**ckpt["config"]})
    assert get_lr(ckpt["iter_num"], o, ckpt["train_seconds"]) == pytest.approx(o.min_lr)  # cooled down
    assert f"done: final val loss {ckpt['best_val_loss']:.4f}; {ckpt['iter_num']:,} iterations" in out
    # resuming with a larger budget trains for what is left of it
    run(tiny_model_args, data_dir, tmp_path / "out", *budget, "--max_seconds=3", "--init_from=resume")
    again = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] < again["iter_num"] < 1000000 and again["train_seconds"] >= 3.0


def test_target_val_loss_stops_at_the_first_evaluation_reaching_it(
    prepare_char_dataset, tiny_model_args, tmp_path, capsys, monkeypatch
):
    import nanogpt.train

    val = iter([3.0, 2.5, 2.0, 1.9, 1.8])  # scripted evaluations at iterations 0, 2, 4, ...
    monkeypatch.setattr(nanogpt.train, "estimate_loss", lambda *args: {"train": 1.0, "val": next(val)})
    data_dir = prepare_char_dataset()
    extra = ("--max_iters=100", "--eval_interval=2", "--target_val_loss=2.2", "--milestones=2.8,1.0")
    run(tiny_model_args, data_dir, tmp_path / "out", *extra)
    out = capsys.readouterr().out
    assert re.findall(r"^step (\d+): ", out, re.M) == ["0", "2", "4"]
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 4
    closing = out.strip().splitlines()[-1]
    assert closing.startswith("done: final val loss 2.0000; 4 iterations")
    assert re.search(r"val <= 2\.8 first at iteration 2: [\d.]+ s of training, [\d.]+ s wall", closing)
    assert re.search(r"val <= 2\.2 first at iteration 4: [\d.]+ s of training, [\d.]+ s wall", closing)
    assert "val <= 1.0 not reached" in closing


def test_our_muon_is_torchs_muon_with_a_choice_of_iteration_dtype():
    """In bfloat16 it is torch.optim.Muon step for step, bit for bit, with the same state (same-shaped matrices
    batched into one iteration included); in float32 (on CPUs) the update is still an approximate
    orthogonalisation: singular values near 1."""
    from nanogpt.optim import Muon, newton_schulz

    torch.manual_seed(0)
    shapes = [(8, 16), (24, 8), (8, 16), (24, 8), (5, 5)]
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kwargs = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    reference, ours = torch.optim.Muon(copies, **kwargs), Muon(params, torch.bfloat16, **kwargs)
    for _ in range(3):
        for p, c in zip(params, copies):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        reference.step()
        ours.step()
    for p, c in zip(params, copies):
        assert torch.equal(p, c)
    assert str(ours.state_dict()) == str(reference.state_dict())
    g = torch.randn(32, 64)
    s = torch.linalg.svdvals(newton_schulz(g, 5, 1e-7, (3.4445, -4.775, 2.0315), torch.float32))
    assert 0.5 < s.min() and s.max() < 1.5  # Keller Jordan's iteration: S' ~ Uniform(0.5, 1.5), not exactly 1


def test_the_speedrun_configs_turn_the_recipe_on_and_train(tmp_path, capsys):
    """Both speedrun configs parse into valid options with the recipe's techniques (RoPE, QK-norm, ReLU², the
    token shift, Muon, WSD; the CPU one's 6 x 128 contexts and Muon at half the rate), and the CPU one trains
    (a few seconds of its budget, on generated data) through to its closing line with them: the model's
    options in its checkpoint, Muon's rate half AdamW's."""
    from forkrun import make_dataset

    from nanogpt.config import parse_args

    for name in ("speedrun_shakespeare_char_cpu.py", "speedrun_shakespeare_char.py"):
        o, _ = parse_args(TrainOptions, [f"config/{name}"], "train", "")
        assert (o.pos_emb, o.qk_norm, o.activation, o.optimizer, o.lr_schedule, o.token_shift) == (
            "rope",
            True,
            "relu2",
            "muon",
            "wsd",
            True,
        )
        assert o.max_seconds > 0 and o.max_iters >= 100000
        if name == "speedrun_shakespeare_char_cpu.py":  # the seed's 768 tokens a step in 128-character contexts
            assert (o.batch_size, o.block_size, o.muon_lr_scale) == (6, 128, 0.5)
    data = make_dataset(tmp_path / "data")
    small = ("--max_seconds=2", "--n_layer=1", "--n_embd=32", "--block_size=16", "--eval_iters=2")
    train_main(
        ["config/speedrun_shakespeare_char_cpu.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *small]
    )
    assert "done: final val loss" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    model_args = ckpt["model_args"]
    assert (model_args["pos_emb"], model_args["qk_norm"], model_args["token_shift"]) == ("rope", True, True)
    adamw_lr = {g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    muon_lr = {g["lr"] for g in ckpt["muon_optimizer"]["param_groups"]}
    assert len(adamw_lr) == len(muon_lr) == 1
    assert muon_lr.pop() == pytest.approx(0.5 * adamw_lr.pop())  # muon_lr_scale applied while training

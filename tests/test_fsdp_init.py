"""--fsdp=True builds the model on the meta device and initialises each process's shards (issue 21, item 3):
the weights must be those of GPT(config) after torch.manual_seed(seed) on one process, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed

from nanogpt.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# Runs in each torchrun worker: nanogpt's real train.main, with shard() and setup() instrumented.
DRIVER = """
import os
import sys

import torch

import nanogpt.train as train

seen = {}
shard, setup = train.shard, train.setup


def spy_shard(model, at, dtype):
    # where the weights are as sharding starts: on the meta device, nothing of the model is allocated yet
    seen["devices_before_shard"] = sorted({p.device.type for p in model.parameters()})
    shard(model, at, dtype)


def record_setup(o, explicit, at, dtype):
    # the sharded model as setup() hands it to the loop, gathered whole (full_tensor: a collective)
    state, batches, resumed = setup(o, explicit, at, dtype)
    model = state.model
    seen["weights"] = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    seen["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
    seen["tied"] = model.transformer.wte.weight is model.lm_head.weight
    seen["config"] = model.config.to_dict()
    torch.save(seen, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
    return state, batches, resumed


train.shard, train.setup = spy_shard, record_setup
train.main(sys.argv[2:])
"""

RECIPE = (
    "--pos_emb=rope", "--qk_norm=True", "--token_shift=True", "--activation=relu2", "--logit_softcap=15.0",
    "--norm=rmsnorm", "--tie_weights=False", "--zero_init_proj=True", "--bias=True",
)  # fmt: skip


@pytest.fixture
def run_sharded(run_script, tiny_checkpoint, tiny_model_args, tmp_path):
    """run_sharded(*options, nproc=2) -> what each FSDP worker (gloo on the CPU) saw, after setup() of train.py's
    main."""
    driver = tmp_path / "fsdp_init_driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    args = [a for a in tiny_model_args if not a.startswith(("--gradient_accumulation_steps", "--n_layer"))]

    def run(*options: str, nproc: int = 2) -> list[dict]:
        records = tmp_path / "records"
        records.mkdir(exist_ok=True)
        proc = run_script(
            "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", driver, records, *args,
            "--n_layer=2", "--gradient_accumulation_steps=2", f"--data_dir={tiny_checkpoint.parent / 'data'}",
            f"--out_dir={tmp_path / 'out'}", "--fsdp=True", "--dtype=float32", *options, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        return [torch.load(records / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(nproc)]

    return run


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [n for n in want if got[n].dtype != want[n].dtype or not torch.equal(got[n], want[n])]
    assert not differ, f"not bit-identical: {differ}"


@pytest.mark.parametrize("options", [(), RECIPE], ids=["defaults", "rope-qknorm-shift-relu2-softcap-untied"])
def test_sharded_initialisation_is_the_unsharded_one_bit_for_bit(run_sharded, options):
    """Both processes build the model on the meta device (nothing allocated before sharding), then each
    materialises and initialises its shards; gathered, they are GPT(config) after torch.manual_seed(seed)
    exactly: every weight, RoPE's tables (recomputed after to_empty) and the tying of wte and lm_head."""
    seed = 4321
    ranks = run_sharded(f"--seed={seed}", "--eval_only=True", *options)
    torch.manual_seed(seed)
    want = GPT(GPTConfig(**ranks[0]["config"]))
    assert want.config.vocab_size % 2, "an odd vocabulary: the embedding's rows split unevenly over 2 processes"
    for rank in ranks:
        assert rank["devices_before_shard"] == ["meta"]
        assert_same_weights(rank["weights"], dict(want.named_parameters()))
        assert_same_weights(rank["buffers"], dict(want.named_buffers()))
        assert rank["tied"] == want.config.tie_weights
    if options:
        assert {"rope_cos", "rope_sin"} <= ranks[0]["buffers"].keys()
        assert "transformer.shift.weight" in ranks[0]["weights"]


def test_resuming_from_shards_builds_on_meta_and_loads_the_saved_weights(run_sharded, run_script, tmp_path):
    """A run resumed from a sharded checkpoint (ckpt.dcp) builds its model on the meta device too: the
    shards loaded into it are the saved weights (ckpt.pt, consolidated from them), RoPE's tables computed."""
    from nanogpt.checkpoint import load_checkpoint, strip_prefixes

    run_sharded("--max_iters=2", "--eval_interval=2", *RECIPE)  # writes ckpt.dcp, consolidated into ckpt.pt
    saved = strip_prefixes(load_checkpoint(tmp_path / "out" / "ckpt.pt")["model"])
    ranks = run_sharded("--init_from=resume", "--eval_only=True")
    torch.manual_seed(0)
    want = GPT(GPTConfig(**ranks[0]["config"]))
    want.load_state_dict(saved)
    for rank in ranks:
        assert rank["devices_before_shard"] == ["meta"]
        assert_same_weights(rank["weights"], dict(want.named_parameters()))
        assert_same_weights(rank["buffers"], dict(want.named_buffers()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.py runs it there)")
def test_sharded_initialisation_on_cuda_is_the_unsharded_one_bit_for_bit(run_sharded):
    """The GPU path (NCCL): the shards are drawn on the CPU a parameter at a time and copied to the GPU, so
    they equal the CPU's GPT(config) after the same seed, bit for bit."""
    seed = 4321
    (rank,) = run_sharded(f"--seed={seed}", "--eval_only=True", "--device=cuda", *RECIPE, nproc=1)
    torch.manual_seed(seed)
    want = GPT(GPTConfig(**rank["config"]))
    assert rank["devices_before_shard"] == ["meta"]
    assert_same_weights(rank["weights"], dict(want.named_parameters()))
    assert_same_weights(rank["buffers"], dict(want.named_buffers()))

# The GPU speedrun: the baby GPT of train_shakespeare_char.py (6 layers x 384, context 256) with the
# techniques of docs/recipe.md, for val loss <= 1.47 within 30 s of training on one H100/H200.
# Not measured on a GPU yet: `bash .ci/gpu` runs it and reports when val <= 1.47 was first reached.

out_dir = "out-speedrun-shakespeare-char"
dataset = "shakespeare_char"

eval_interval = 100
eval_iters = 50
log_interval = 10
always_save_checkpoint = True

gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
pos_emb = "rope"
qk_norm = True
activation = "relu2"
token_shift = True

optimizer = "muon"
lr_schedule = "wsd"
cooldown_frac = 0.3
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

max_iters = 100000  # the time budget decides
lr_decay_iters = 100000
max_seconds = 30
milestones = "1.47"

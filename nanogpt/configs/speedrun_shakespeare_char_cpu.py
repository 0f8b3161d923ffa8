# The CPU speedrun (docs/recipe.md): the seed CPU command's model (4 layers x 128) and data, with
# the techniques that paid off in the ablation, under a training-time budget, so that the whole command takes
# no longer than the seed CPU command. Defaults elsewhere are untouched: this file turns the options on.

out_dir = "out-speedrun-shakespeare-char-cpu"
dataset = "shakespeare_char"
device = "cpu"
compile = False

eval_interval = 100  # fine enough to time the milestones
eval_iters = 20
log_interval = 50
always_save_checkpoint = True

gradient_accumulation_steps = 1
batch_size = 6  # x 128 characters: the seed's 768 tokens a step, in longer contexts (docs/recipe.md)
block_size = 128

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos_emb = "rope"
qk_norm = True
activation = "relu2"
token_shift = True

optimizer = "muon"
lr_schedule = "wsd"
cooldown_frac = 0.3
learning_rate = 2e-3  # the best of 1e-3, 2e-3 and 3e-3 at this budget (docs/recipe.md)
muon_lr_scale = 0.5  # the best of x0.25 to x10 at this size and budget (docs/recipe.md)
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

max_iters = 1000000  # the time budget decides
lr_decay_iters = 1000000
max_seconds = 120  # with evaluations and start-up, the whole command takes less than the seed command
milestones = "1.886,1.6,1.5"
